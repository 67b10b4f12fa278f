"""One planning round: budget, fair order, token and slot admission, and the visibility record.

`plan_round(config, state, observation)` is a pure function. The plan it returns carries `next_state`; the
caller keeps that and passes it to the next round, so no policy state hides in an object between calls.

Admission walks jobs in fair order (fairness.py) and admits a job's whole step when its tokens fit in
`budget - tokens in flight` and its 2q probe slots fit (slots.py). When the job at the head of the order
does not fit yet, no job behind it is admitted this round (no overtaking): otherwise small steps would keep
slipping into every gap and a large step would wait forever. Jobs that can never fit (a step above
`max_tokens_in_flight`, or more probe slots than the engine can ever spare) are skipped and block no one.

A head step larger than the current budget waits until no probe is in flight and then runs alone, if no
user waits and latency is within target (`admit_oversize_step_alone`). This bounds what a big-step job can
cost users to one step at a time and keeps it from starving; splitting steps into chunks would do better.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from scheduler.planning.controller import ControllerConfig, ControllerState, initial_controller_state, update_budget
from scheduler.planning.fairness import (
    FairnessState,
    charge,
    close_round,
    fair_order,
    recent_shares,
    refund,
    sync_jobs,
)
from scheduler.planning.records import (
    JobDemand,
    JobShareRecord,
    JobStatus,
    LatencySignal,
    PlannerRecord,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    require,
    require_count,
    require_finite,
)
from scheduler.planning.slots import ProbeDemand, SlotPlan, plan_slots


@dataclass(frozen=True)
class PlannerConfig:
    controller: ControllerConfig
    num_slots: int
    num_reserved_serving_slots: int = 0
    share_decay: float = 0.9  # EWMA decay per round of the per-job share shown in the record
    # A step larger than the current budget (but within max_tokens_in_flight) may run alone when no probe is
    # in flight, no user waits and latency is within target, like TCP sending one segment whatever cwnd says.
    # Without it, a big-step job starves whenever users keep the budget below its step size.
    admit_oversize_step_alone: bool = True

    def __post_init__(self) -> None:
        require(isinstance(self.controller, ControllerConfig), "controller", "must be a ControllerConfig")
        require_count(self.num_slots, "num_slots")
        require(self.num_slots > 0, "num_slots", "must be > 0")
        require_count(self.num_reserved_serving_slots, "num_reserved_serving_slots")
        require(self.num_reserved_serving_slots < self.num_slots, "num_reserved_serving_slots", "must be < num_slots")
        require(0.0 <= self.share_decay < 1.0, "share_decay", "must be in [0, 1)")


@dataclass(frozen=True)
class PlannerState:
    controller: ControllerState
    fairness: FairnessState = field(default_factory=FairnessState)
    num_rounds: int = 0


def initial_planner_state(config: PlannerConfig) -> PlannerState:
    return PlannerState(controller=initial_controller_state(config.controller))


@dataclass(frozen=True)
class RoundObservation:
    """Everything the planner needs, gathered by the loop right before it calls `plan_round`.

    num_probe_tokens_in_flight: scoring tokens submitted and not yet finished (a step's sequences count
        until each one returns its log-probs).
    """

    now_s: float
    latency: LatencySignal
    num_probe_tokens_in_flight: int
    jobs: tuple[JobDemand, ...] = ()
    slots: tuple[SlotOccupancy, ...] = ()
    serving_demands: tuple[ServingDemand, ...] = ()

    def __post_init__(self) -> None:
        require_finite(self.now_s, "now_s")
        require(isinstance(self.latency, LatencySignal), "latency", "must be a LatencySignal")
        require_count(self.num_probe_tokens_in_flight, "num_probe_tokens_in_flight")
        job_ids = [job.job_id for job in self.jobs]
        require(len(set(job_ids)) == len(job_ids), "jobs", "a job_id appears twice")


@dataclass(frozen=True)
class StepGrant:
    """Submit one step of `job_id` now: write its 2q probe states into `probe_slot_ids`, then its sequences."""

    job_id: str
    num_tokens: int
    probe_slot_ids: tuple[int, ...]


@dataclass(frozen=True)
class RoundPlan:
    step_grants: tuple[StepGrant, ...]
    slots: SlotPlan
    record: PlannerRecord
    next_state: PlannerState

    @property
    def num_tokens_admitted(self) -> int:
        return sum(grant.num_tokens for grant in self.step_grants)


def _admit_tokens(
    config: PlannerConfig,
    ordered: tuple[JobDemand, ...],
    controller: ControllerState,
    observation: RoundObservation,
) -> tuple[list[JobDemand], dict[str, JobStatus]]:
    budget = controller.budget_tokens
    num_free_tokens = max(0, budget - observation.num_probe_tokens_in_flight)
    latency_ok = controller.measured_ttft_ms is None or controller.measured_ttft_ms <= controller.target_ttft_ms
    may_run_alone = (
        config.admit_oversize_step_alone
        and budget > 0  # a zero budget means "ZO off", not "one step at a time"
        and observation.num_probe_tokens_in_flight == 0
        and observation.latency.num_user_waiting == 0
        and latency_ok
    )
    admitted: list[JobDemand] = []
    statuses: dict[str, JobStatus] = {}
    head_blocked = False
    for job in ordered:
        oversize = job.num_step_tokens > budget
        if job.num_step_tokens > config.controller.max_tokens_in_flight or (
            oversize and not config.admit_oversize_step_alone
        ):
            statuses[job.job_id] = JobStatus.STEP_EXCEEDS_MAX  # can never fit: skipped, blocks no one
        elif head_blocked:
            statuses[job.job_id] = JobStatus.BEHIND_BLOCKED_JOB
        elif not oversize and job.num_step_tokens <= num_free_tokens:
            admitted.append(job)
            num_free_tokens -= job.num_step_tokens
        elif oversize and may_run_alone and not admitted:
            admitted.append(job)
            head_blocked = True  # alone means alone
        else:
            # Head of the queue waits for in-flight probes to drain (or the budget to grow); nobody overtakes.
            statuses[job.job_id] = JobStatus.STEP_EXCEEDS_BUDGET if oversize else JobStatus.WAITING_FOR_TOKENS
            head_blocked = True
    return admitted, statuses


def plan_round(config: PlannerConfig, state: PlannerState, observation: RoundObservation) -> RoundPlan:
    in_flight = observation.num_probe_tokens_in_flight
    fairness = sync_jobs(state.fairness, observation.jobs)
    ordered = fair_order(fairness, observation.jobs)
    wanted = in_flight + sum(job.num_step_tokens for job in ordered)
    controller = update_budget(config.controller, state.controller, observation.latency, in_flight, wanted)

    admitted, statuses = _admit_tokens(config, ordered, controller, observation)
    slot_plan = plan_slots(
        config.num_slots,
        observation.slots,
        observation.serving_demands,
        [ProbeDemand(job.job_id, job.num_probe_slots) for job in admitted],
        config.num_reserved_serving_slots,
    )
    statuses.update(dict(slot_plan.blocked_jobs))

    jobs_by_id = {job.job_id: job for job in observation.jobs}
    grants: list[StepGrant] = []
    for probe in slot_plan.probe_grants:
        job = jobs_by_id[probe.job_id]
        grants.append(StepGrant(job.job_id, job.num_step_tokens, probe.slot_ids))
        fairness = charge(fairness, job.job_id, job.num_step_tokens, job.weight)
        statuses[job.job_id] = JobStatus.GRANTED
    granted_tokens = {grant.job_id: grant.num_tokens for grant in grants}
    fairness = close_round(fairness, granted_tokens, config.share_decay)

    next_state = PlannerState(controller=controller, fairness=fairness, num_rounds=state.num_rounds + 1)
    record = _record(config, next_state, observation, slot_plan, statuses, granted_tokens)
    return RoundPlan(step_grants=tuple(grants), slots=slot_plan, record=record, next_state=next_state)


def _record(
    config: PlannerConfig,
    state: PlannerState,
    observation: RoundObservation,
    slot_plan: SlotPlan,
    statuses: dict[str, JobStatus],
    granted_tokens: dict[str, int],
) -> PlannerRecord:
    fair = state.fairness.by_job()
    shares = recent_shares(state.fairness)
    jobs = []
    for job in sorted(observation.jobs, key=lambda job: job.job_id):
        if job.is_paused:
            status = JobStatus.PAUSED
        elif job.has_step_in_flight:
            status = JobStatus.STEP_IN_FLIGHT
        else:
            status = statuses[job.job_id]
        entry = fair.get(job.job_id)
        jobs.append(
            JobShareRecord(
                job_id=job.job_id,
                weight=job.weight,
                status=status,
                num_tokens_granted=granted_tokens.get(job.job_id, 0),
                num_tokens_granted_total=0 if entry is None else entry.num_tokens_granted_total,
                recent_token_share=shares.get(job.job_id, 0.0),
            )
        )
    num_admitted = sum(granted_tokens.values())
    train = observation.num_probe_tokens_in_flight + num_admitted
    serve = observation.latency.num_user_tokens_in_flight
    total = train + serve
    occupancy = slot_plan.occupancy
    num_serving = sum(1 for slot in occupancy if slot.kind is SlotKind.SERVING)
    num_probe = sum(1 for slot in occupancy if slot.kind is SlotKind.PROBE)
    return PlannerRecord(
        num_round=state.num_rounds,
        budget_tokens=state.controller.budget_tokens,
        max_tokens_in_flight=config.controller.max_tokens_in_flight,
        measured_ttft_ms=state.controller.measured_ttft_ms,
        target_ttft_ms=state.controller.target_ttft_ms,
        budget_reason=state.controller.last_reason.value,
        num_probe_tokens_in_flight=observation.num_probe_tokens_in_flight,
        num_tokens_admitted=num_admitted,
        num_user_tokens_in_flight=serve,
        num_user_waiting=observation.latency.num_user_waiting,
        num_engine_running=observation.latency.num_engine_running,
        num_engine_waiting=observation.latency.num_engine_waiting,
        train_token_share=train / total if total else 0.0,
        serve_token_share=serve / total if total else 0.0,
        num_slots=config.num_slots,
        num_slots_serving=num_serving,
        num_slots_probe=num_probe,
        num_slots_free=config.num_slots - len(occupancy),
        jobs=tuple(jobs),
    )


def refund_step(state: PlannerState, grant: StepGrant, weight: float) -> PlannerState:
    """Give back a granted step the loop could not submit, so the job does not pay for work never done."""
    return replace(state, fairness=refund(state.fairness, grant.job_id, grant.num_tokens, weight))
