"""A fabricated engine for planner tests: each granted step finishes after a fixed number of rounds."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from scheduler.planning import (
    ControllerConfig,
    JobDemand,
    LatencySignal,
    PlannerConfig,
    RoundObservation,
    SlotKind,
    SlotOccupancy,
    initial_planner_state,
    plan_round,
)


@dataclass(frozen=True)
class Job:
    job_id: str
    weight: float
    num_step_tokens: int
    num_probe_slots: int = 2


@dataclass
class Harness:
    config: PlannerConfig
    tokens_per_round_per_step: int = 1000
    state: object = None
    steps: dict = field(default_factory=dict)  # job_id -> (rounds left, tokens, slot ids)
    granted: dict = field(default_factory=dict)
    grants_log: list = field(default_factory=list)
    plans: list = field(default_factory=list)

    def __post_init__(self):
        self.state = initial_planner_state(self.config)

    def round(self, jobs, paused=frozenset(), latency=None):
        observation = RoundObservation(
            now_s=float(len(self.plans)),
            latency=latency or LatencySignal(),
            num_probe_tokens_in_flight=sum(tokens for _, tokens, _ in self.steps.values()),
            jobs=tuple(
                JobDemand(
                    j.job_id,
                    j.weight,
                    j.num_step_tokens,
                    j.num_probe_slots,
                    is_paused=j.job_id in paused,
                    has_step_in_flight=j.job_id in self.steps,
                )
                for j in jobs
            ),
            slots=tuple(
                SlotOccupancy(slot_id, SlotKind.PROBE, job_id, 1)
                for job_id, (_, _, slot_ids) in self.steps.items()
                for slot_id in slot_ids
            ),
        )
        plan = plan_round(self.config, self.state, observation)
        self.state = plan.next_state
        self.plans.append(plan)
        for grant in plan.step_grants:
            rounds = max(1, math.ceil(grant.num_tokens / self.tokens_per_round_per_step))
            self.steps[grant.job_id] = (rounds, grant.num_tokens, grant.probe_slot_ids)
            self.granted[grant.job_id] = self.granted.get(grant.job_id, 0) + grant.num_tokens
        self.grants_log.append(tuple(grant.job_id for grant in plan.step_grants))
        for job_id in list(self.steps):
            rounds, tokens, slot_ids = self.steps[job_id]
            if rounds <= 1:
                del self.steps[job_id]
            else:
                self.steps[job_id] = (rounds - 1, tokens, slot_ids)
        return plan


def fixed_budget(num_tokens: int, num_slots: int = 16) -> PlannerConfig:
    controller = ControllerConfig(
        target_ttft_ms=100.0,
        max_tokens_in_flight=num_tokens,
        min_tokens_in_flight=num_tokens,
        initial_tokens_in_flight=num_tokens,
    )
    return PlannerConfig(controller=controller, num_slots=num_slots)
