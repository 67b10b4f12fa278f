"""Co-scheduling policy: how much ZO scoring work runs next to user traffic, in which slots, for which job.

Pure: no torch, no vllm, no asyncio, no I/O. Policy here, mechanism in the step loop (vLLM-scheduler style).

Contract for the loop that carries plans out (a round whenever something changes: a chunk returns, a step
ends, a user arrives or gets its first token; otherwise every few hundred ms):

    config = PlannerConfig(controller=ControllerConfig(target_ttft_ms=..., max_tokens_in_flight=...),
                           num_slots=max_loras, num_reserved_serving_slots=1)
    state = initial_planner_state(config)
    while running:
        observation = RoundObservation(
            now_s=monotonic(),
            latency=LatencySignal(ttft_p95_ms=percentile_ms(recent_ttfts_ms, 0.95), num_user_running=...,
                                  num_user_waiting=..., num_engine_running=..., num_engine_waiting=...,
                                  num_user_tokens_in_flight=..., seconds_since_user_arrival_s=...,
                                  max_user_wait_ms=...),
            num_probe_tokens_in_flight=...,   # tokens of admitted chunks not yet returned
            jobs=(JobDemand(job_id, weight, num_step_tokens=B*2q*seq_len, num_probe_slots=2q,
                            is_paused=..., has_step_in_flight=..., wants_step=..., idle_s=...), ...),
            slots=(SlotOccupancy(slot_id, SlotKind.SERVING | SlotKind.PROBE, owner, num_in_flight, last_used_s), ...),
            serving_demands=(ServingDemand(adapter_key="name@version", num_waiting=..., is_pinned=...), ...),
            chunk_requests=(ChunkRequest(request_id, job_id, num_tokens), ...),   # oldest first
        )
        plan = plan_round(config, state, observation)
        state = plan.next_state                      # the only state; keep it, pass it back next round
        for eviction in plan.slots.to_evict: ...     # bookkeeping only: slots are pinned, contents overwritten
        for load in plan.slots.to_load: ...          # copy stored state load.adapter_key into load.slot_id
        for grant in plan.step_grants: ...           # write 2q probe states into grant.probe_slot_ids, then
                                                     # queue the step's sequences as chunks
        for chunk in plan.chunk_grants: ...          # submit that chunk's sequences at low priority
        hold back user requests for plan.slots.deferred_adapter_keys (they have no slot yet)
        export plan.record (PlannerRecord) to logs / Prometheus

Rules the loop must keep: submit user requests only for adapter keys resident in `plan.slots.occupancy`
(vLLM must never see more distinct adapters than slots); report a slot's in-flight requests truthfully
(the planner never touches a slot with any); call `refund_step(state, grant, weight)` if a granted step
is not submitted.
Everything raises `PlanningError` (a ValueError naming the field) on an inconsistent observation.

Modules: controller (token budget from latency), fairness (weighted fair order over jobs), slots (slot
assignment), planner (one round), records (observation and record types), simulate (synthetic engine).
"""

from scheduler.planning.controller import (
    BudgetReason,
    ControllerConfig,
    ControllerState,
    initial_controller_state,
    percentile_ms,
    update_budget,
)
from scheduler.planning.fairness import FairnessState, JobFairState
from scheduler.planning.planner import (
    PlannerConfig,
    PlannerState,
    RoundObservation,
    RoundPlan,
    StepGrant,
    admit_chunks,
    initial_planner_state,
    plan_round,
    refund_step,
)
from scheduler.planning.records import (
    ChunkRequest,
    JobDemand,
    JobShareRecord,
    JobStatus,
    LatencySignal,
    PlannerRecord,
    PlanningError,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
)
from scheduler.planning.slots import ProbeDemand, ProbeGrant, SlotEviction, SlotLoad, SlotPlan, plan_slots

__all__ = [
    "BudgetReason",
    "ChunkRequest",
    "ControllerConfig",
    "ControllerState",
    "FairnessState",
    "JobDemand",
    "JobFairState",
    "JobShareRecord",
    "JobStatus",
    "LatencySignal",
    "PlannerConfig",
    "PlannerRecord",
    "PlannerState",
    "PlanningError",
    "ProbeDemand",
    "ProbeGrant",
    "RoundObservation",
    "RoundPlan",
    "ServingDemand",
    "SlotEviction",
    "SlotKind",
    "SlotLoad",
    "SlotOccupancy",
    "SlotPlan",
    "StepGrant",
    "admit_chunks",
    "initial_controller_state",
    "initial_planner_state",
    "percentile_ms",
    "plan_round",
    "plan_slots",
    "refund_step",
    "update_budget",
]
