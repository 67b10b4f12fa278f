"""One planning round: budget, fair step grants, slots, chunk admission, and the visibility record.

`plan_round(config, state, observation)` is a pure function. The plan it returns carries `next_state`; the
caller keeps that and passes it to the next round, so no policy state hides in an object between calls.

Two levels of admission:

1. **Steps** (which job may run its next step now): jobs in fair order (fairness.py), each within its
   weighted share, get their 2q probe slots (slots.py, all or nothing, no overtaking). Fairness charges the
   whole step's tokens at grant time. A step grant does not put anything into the engine yet.
2. **Chunks** (how much probe work is in the engine): a granted step submits its sequences as chunks of a
   few hundred tokens. Chunks enter FIFO while tokens in flight + the chunk fit the controller's budget
   (controller.py); the head chunk blocks the ones behind it. A chunk larger than the budget enters alone
   when nothing else is in flight, so no step can be stuck.

So the budget bounds the probe tokens any engine forward can hold, which is what a user arriving waits
behind, and the controller moves it between one chunk (users present, latency tight) and the engine's
full width (no users). While a user waits for its first token no chunk enters at all
(`hold_chunks_while_users_wait`): its prefill shares the engine only with the probes already in flight.
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
    ChunkRequest,
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
    # How far (virtual time: tokens / weight) a job may run ahead of the slowest active job; 0 is strict.
    fairness_max_lead: float = 0.0
    # No chunk enters while a user request waits for its first token: its prefill gets the engine without
    # new probe work; probes already in flight finish (a forward cannot be preempted).
    hold_chunks_while_users_wait: bool = True
    # ... but never for longer than this in a row: under sustained load some user is always waiting, and the
    # hold alone would stop ZO for good (the budget's floor is the trickle that is meant to remain).
    max_hold_s: float = 0.25
    # A job between two steps keeps its place for this long (commit and publish take milliseconds; an
    # evaluation or a data wait longer than this must not hold the other jobs back).
    fairness_idle_grace_s: float = 1.0

    def __post_init__(self) -> None:
        require(isinstance(self.controller, ControllerConfig), "controller", "must be a ControllerConfig")
        require_count(self.num_slots, "num_slots")
        require(self.num_slots > 0, "num_slots", "must be > 0")
        require_count(self.num_reserved_serving_slots, "num_reserved_serving_slots")
        require(self.num_reserved_serving_slots < self.num_slots, "num_reserved_serving_slots", "must be < num_slots")
        require(0.0 <= self.share_decay < 1.0, "share_decay", "must be in [0, 1)")
        require_finite(self.fairness_max_lead, "fairness_max_lead")
        require(self.fairness_max_lead >= 0.0, "fairness_max_lead", "must be >= 0")
        require_finite(self.max_hold_s, "max_hold_s")
        require(self.max_hold_s >= 0.0, "max_hold_s", "must be >= 0")
        require_finite(self.fairness_idle_grace_s, "fairness_idle_grace_s")
        require(self.fairness_idle_grace_s >= 0.0, "fairness_idle_grace_s", "must be >= 0")


@dataclass(frozen=True)
class PlannerState:
    controller: ControllerState
    fairness: FairnessState = field(default_factory=FairnessState)
    num_rounds: int = 0
    hold_since_s: float | None = None  # when the current hold on chunks began (None: not holding)


def initial_planner_state(config: PlannerConfig) -> PlannerState:
    return PlannerState(controller=initial_controller_state(config.controller))


@dataclass(frozen=True)
class RoundObservation:
    """Everything the planner needs, gathered by the loop right before it calls `plan_round`.

    num_probe_tokens_in_flight: tokens of admitted chunks not yet returned from the engine.
    chunk_requests: chunks of granted steps waiting to enter the engine, oldest first.
    """

    now_s: float
    latency: LatencySignal
    num_probe_tokens_in_flight: int
    jobs: tuple[JobDemand, ...] = ()
    slots: tuple[SlotOccupancy, ...] = ()
    serving_demands: tuple[ServingDemand, ...] = ()
    chunk_requests: tuple[ChunkRequest, ...] = ()

    def __post_init__(self) -> None:
        require_finite(self.now_s, "now_s")
        require(isinstance(self.latency, LatencySignal), "latency", "must be a LatencySignal")
        require_count(self.num_probe_tokens_in_flight, "num_probe_tokens_in_flight")
        job_ids = [job.job_id for job in self.jobs]
        require(len(set(job_ids)) == len(job_ids), "jobs", "a job_id appears twice")
        request_ids = [chunk.request_id for chunk in self.chunk_requests]
        require(len(set(request_ids)) == len(request_ids), "chunk_requests", "a request_id appears twice")


@dataclass(frozen=True)
class StepGrant:
    """`job_id` may run one step now: write its 2q probe states into `probe_slot_ids`, then ask for chunks."""

    job_id: str
    num_tokens: int
    probe_slot_ids: tuple[int, ...]


@dataclass(frozen=True)
class RoundPlan:
    step_grants: tuple[StepGrant, ...]
    chunk_grants: tuple[ChunkRequest, ...]  # submit these chunks to the engine now
    slots: SlotPlan
    record: PlannerRecord
    next_state: PlannerState

    @property
    def num_tokens_admitted(self) -> int:
        return sum(chunk.num_tokens for chunk in self.chunk_grants)


def admit_chunks(
    budget_tokens: int, num_tokens_in_flight: int, requests: tuple[ChunkRequest, ...]
) -> tuple[ChunkRequest, ...]:
    """FIFO admission under the budget; the head blocks the rest; an oversize head enters alone."""
    admitted: list[ChunkRequest] = []
    in_flight = num_tokens_in_flight
    for chunk in requests:
        if in_flight + chunk.num_tokens <= budget_tokens or (in_flight == 0 and budget_tokens > 0):
            admitted.append(chunk)
            in_flight += chunk.num_tokens
        else:
            break
    return tuple(admitted)


def plan_round(config: PlannerConfig, state: PlannerState, observation: RoundObservation) -> RoundPlan:
    in_flight = observation.num_probe_tokens_in_flight

    def fair_slots(jobs: tuple[JobDemand, ...]):  # -> (fairness, eligible, ahead, slot plan)
        fairness = sync_jobs(state.fairness, jobs, config.fairness_idle_grace_s)
        eligible, ahead = fair_order(fairness, jobs, config.fairness_idle_grace_s, config.fairness_max_lead)
        slot_plan = plan_slots(
            config.num_slots,
            observation.slots,
            observation.serving_demands,
            [ProbeDemand(job.job_id, job.num_probe_slots) for job in eligible],
            config.num_reserved_serving_slots,
        )
        return fairness, eligible, ahead, slot_plan

    fairness, eligible, ahead, slot_plan = fair_slots(observation.jobs)
    unservable = {
        job_id for job_id, status in slot_plan.blocked_jobs if status is JobStatus.NEEDS_MORE_SLOTS_THAN_EXIST
    }
    if unservable:
        # Its slots are held by serving adapters; until they are given back it leaves the fair queue as a
        # paused job does, or with the smallest tag it would hold every other job "ahead of share" for good.
        fair_jobs = tuple(replace(job, is_paused=True) if job.job_id in unservable else job for job in observation.jobs)
        fairness, eligible, ahead, slot_plan = fair_slots(fair_jobs)
    queued = sum(chunk.num_tokens for chunk in observation.chunk_requests)
    wanted = in_flight + queued + sum(job.num_step_tokens for job in eligible)
    controller = update_budget(
        config.controller, state.controller, observation.latency, in_flight, wanted, observation.now_s
    )

    statuses: dict[str, JobStatus] = {job.job_id: JobStatus.AHEAD_OF_SHARE for job in ahead}
    statuses.update({job_id: JobStatus.NEEDS_MORE_SLOTS_THAN_EXIST for job_id in unservable})
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

    hold_since = _hold_since(config, state, observation)
    holding = hold_since is not None and observation.now_s - hold_since < config.max_hold_s
    chunks = () if holding else admit_chunks(controller.budget_tokens, in_flight, observation.chunk_requests)
    if chunks:
        hold_since = None  # a hold that had to give way starts afresh
    next_state = PlannerState(
        controller=controller, fairness=fairness, num_rounds=state.num_rounds + 1, hold_since_s=hold_since
    )
    record = _record(config, next_state, observation, slot_plan, statuses, granted_tokens, chunks)
    return RoundPlan(
        step_grants=tuple(grants), chunk_grants=chunks, slots=slot_plan, record=record, next_state=next_state
    )


def _hold_since(config: PlannerConfig, state: PlannerState, observation: RoundObservation) -> float | None:
    """Start of the hold on chunks in force this round, or None when no user waits (or holds are off)."""
    if not (config.hold_chunks_while_users_wait and observation.latency.num_user_waiting > 0):
        return None
    return observation.now_s if state.hold_since_s is None else state.hold_since_s


def _job_status(job: JobDemand, statuses: dict[str, JobStatus]) -> JobStatus:
    if job.is_paused:
        return JobStatus.PAUSED
    if job.has_step_in_flight:
        return JobStatus.STEP_IN_FLIGHT
    if not job.wants_step:
        return JobStatus.IDLE
    return statuses[job.job_id]


def _record(
    config: PlannerConfig,
    state: PlannerState,
    observation: RoundObservation,
    slot_plan: SlotPlan,
    statuses: dict[str, JobStatus],
    granted_tokens: dict[str, int],
    chunks: tuple[ChunkRequest, ...],
) -> PlannerRecord:
    fair = state.fairness.by_job()
    shares = recent_shares(state.fairness)
    jobs = []
    for job in sorted(observation.jobs, key=lambda job: job.job_id):
        entry = fair.get(job.job_id)
        jobs.append(
            JobShareRecord(
                job_id=job.job_id,
                weight=job.weight,
                status=_job_status(job, statuses),
                num_tokens_granted=granted_tokens.get(job.job_id, 0),
                num_tokens_granted_total=0 if entry is None else entry.num_tokens_granted_total,
                recent_token_share=shares.get(job.job_id, 0.0),
            )
        )
    num_admitted = sum(chunk.num_tokens for chunk in chunks)
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
        num_step_tokens_granted=sum(granted_tokens.values()),
        num_chunks_waiting=len(observation.chunk_requests) - len(chunks),
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
    """Give back a granted step the loop could not run, so the job does not pay for work never done."""
    return replace(state, fairness=refund(state.fairness, grant.job_id, grant.num_tokens, weight))
