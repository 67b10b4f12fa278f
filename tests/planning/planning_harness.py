"""A fabricated engine for planner tests: granted steps queue chunks; an admitted chunk returns next round."""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.planning import (
    ChunkRequest,
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
class _Step:
    slot_ids: tuple[int, ...]
    queued: list[ChunkRequest]
    admitted: list[ChunkRequest] = field(default_factory=list)


@dataclass
class Harness:
    config: PlannerConfig
    chunk_tokens: int = 1000
    state: object = None
    steps: dict = field(default_factory=dict)  # job_id -> _Step
    granted: dict = field(default_factory=dict)  # job_id -> step tokens granted
    admitted: dict = field(default_factory=dict)  # job_id -> chunk tokens admitted into the engine
    grants_log: list = field(default_factory=list)
    plans: list = field(default_factory=list)
    next_chunk_id: int = 0

    def __post_init__(self):
        self.state = initial_planner_state(self.config)

    @property
    def num_tokens_in_flight(self) -> int:
        return sum(chunk.num_tokens for step in self.steps.values() for chunk in step.admitted)

    def round(self, jobs, paused=frozenset(), latency=None):
        queued = sorted((c for step in self.steps.values() for c in step.queued), key=lambda c: c.request_id)
        observation = RoundObservation(
            now_s=float(len(self.plans)),
            latency=latency or LatencySignal(),
            num_probe_tokens_in_flight=self.num_tokens_in_flight,
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
                for job_id, step in self.steps.items()
                for slot_id in step.slot_ids
            ),
            chunk_requests=tuple(queued),
        )
        plan = plan_round(self.config, self.state, observation)
        self.state = plan.next_state
        self.plans.append(plan)
        # chunks admitted in an earlier round return now; this round's enter the engine
        for job_id in list(self.steps):
            step = self.steps[job_id]
            step.admitted = []
            if not step.queued:
                del self.steps[job_id]
        for chunk in plan.chunk_grants:
            step = self.steps[chunk.job_id]
            step.queued.remove(chunk)
            step.admitted.append(chunk)
            self.admitted[chunk.job_id] = self.admitted.get(chunk.job_id, 0) + chunk.num_tokens
        for grant in plan.step_grants:
            self.steps[grant.job_id] = _Step(grant.probe_slot_ids, self._chunks(grant.job_id, grant.num_tokens))
            self.granted[grant.job_id] = self.granted.get(grant.job_id, 0) + grant.num_tokens
        self.grants_log.append(tuple(grant.job_id for grant in plan.step_grants))
        return plan

    def _chunks(self, job_id: str, num_tokens: int) -> list[ChunkRequest]:
        chunks = []
        while num_tokens > 0:
            size = min(self.chunk_tokens, num_tokens)
            chunks.append(ChunkRequest(self.next_chunk_id, job_id, size))
            self.next_chunk_id += 1
            num_tokens -= size
        return chunks


def fixed_budget(num_tokens: int, num_slots: int = 16, **planner_options) -> PlannerConfig:
    controller = ControllerConfig(
        target_ttft_ms=100.0,
        max_tokens_in_flight=num_tokens,
        min_tokens_in_flight=num_tokens,
        initial_tokens_in_flight=num_tokens,
    )
    return PlannerConfig(controller=controller, num_slots=num_slots, **planner_options)
