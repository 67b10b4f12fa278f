"""LoRA slot budget: which slot holds what next round, as a pure `(to_evict, to_load)` decision.

The engine has `num_slots` pinned LoRA slots (= vLLM `max_loras`; every adapter in a batch must sit in one,
or the worker evicts a slot a running batch needs and the engine dies). zoserve writes states into slots in
place, so a slot is just a role plus an owner:

- SERVING slots hold `name@version` states that user requests run against: the double buffer of each
  adapting adapter (pinned), exact versions asked for by requests, adapters that are not training.
- PROBE slots hold one job's 2q perturbed copies for one step. Their content is regenerated every step, so
  an idle probe slot is worth nothing and is released at once.

Order of claims, highest first: slots with requests in flight (untouchable) > serving keys that users wait
for or that are pinned > probe steps in fair order (all 2q slots or none) > idle serving adapters kept as a
cache, evicted least recently used first. `num_reserved_serving_slots` of reclaimable slots are kept out of
the probes' reach so that a user asking for a new adapter does not wait for a ZO step to finish.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.planning.records import (
    JobStatus,
    PlanningError,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    require,
    require_count,
)


@dataclass(frozen=True)
class ProbeDemand:
    job_id: str
    num_probe_slots: int


@dataclass(frozen=True)
class SlotEviction:
    slot_id: int
    kind: SlotKind
    owner: str


@dataclass(frozen=True)
class SlotLoad:
    """Write the stored state `adapter_key` into `slot_id` (after the eviction of that slot, if any)."""

    slot_id: int
    adapter_key: str


@dataclass(frozen=True)
class ProbeGrant:
    job_id: str
    slot_ids: tuple[int, ...]


@dataclass(frozen=True)
class SlotPlan:
    to_evict: tuple[SlotEviction, ...]
    to_load: tuple[SlotLoad, ...]
    probe_grants: tuple[ProbeGrant, ...]
    blocked_jobs: tuple[tuple[str, JobStatus], ...]  # probe demands not granted, with why
    deferred_adapter_keys: tuple[str, ...]  # wanted serving keys with no slot this round: keep their requests back
    occupancy: tuple[SlotOccupancy, ...]  # the slot table once the plan is carried out, by slot_id

    def slot_of(self, adapter_key: str) -> int | None:
        for slot in self.occupancy:
            if slot.kind is SlotKind.SERVING and slot.owner == adapter_key:
                return slot.slot_id
        return None


def _validate(
    num_slots: int,
    occupancy: Sequence[SlotOccupancy],
    serving_demands: Sequence[ServingDemand],
    probe_demands: Sequence[ProbeDemand],
    num_reserved_serving_slots: int,
) -> None:
    require_count(num_slots, "num_slots")
    require(num_slots > 0, "num_slots", "must be > 0")
    require_count(num_reserved_serving_slots, "num_reserved_serving_slots")
    slot_ids = [slot.slot_id for slot in occupancy]
    require(len(set(slot_ids)) == len(slot_ids), "occupancy", "a slot_id appears twice")
    for slot_id in slot_ids:
        if slot_id >= num_slots:
            raise PlanningError(f"occupancy: slot_id {slot_id} >= num_slots {num_slots}")
    serving_keys = [slot.owner for slot in occupancy if slot.kind is SlotKind.SERVING]
    require(len(set(serving_keys)) == len(serving_keys), "occupancy", "an adapter_key is resident twice")
    demand_keys = [demand.adapter_key for demand in serving_demands]
    require(len(set(demand_keys)) == len(demand_keys), "serving_demands", "an adapter_key appears twice")
    job_ids = [demand.job_id for demand in probe_demands]
    require(len(set(job_ids)) == len(job_ids), "probe_demands", "a job_id appears twice")
    for demand in probe_demands:
        require_count(demand.num_probe_slots, "num_probe_slots")
        require(demand.num_probe_slots > 0, "num_probe_slots", "must be > 0")


def plan_slots(
    num_slots: int,
    occupancy: Sequence[SlotOccupancy],
    serving_demands: Sequence[ServingDemand],
    probe_demands: Sequence[ProbeDemand],
    num_reserved_serving_slots: int = 0,
) -> SlotPlan:
    """Decide evictions, loads and probe grants. `probe_demands` come in fair order; none overtakes a blocked one."""
    _validate(num_slots, occupancy, serving_demands, probe_demands, num_reserved_serving_slots)
    wanted = {demand.adapter_key: demand for demand in serving_demands if demand.is_pinned or demand.num_waiting > 0}
    table: dict[int, SlotOccupancy] = {slot.slot_id: slot for slot in occupancy}

    def is_protected(slot: SlotOccupancy) -> bool:
        return slot.num_in_flight > 0 or (slot.kind is SlotKind.SERVING and slot.owner in wanted)

    free = [slot_id for slot_id in range(num_slots) if slot_id not in table]
    idle_probe = sorted(s.slot_id for s in occupancy if s.kind is SlotKind.PROBE and not is_protected(s))
    # LRU: oldest first (the fresher of the slot's and the demand's last use); slot_id breaks ties.
    demand_last_used_s = {demand.adapter_key: demand.last_used_s for demand in serving_demands}

    def lru_key(slot: SlotOccupancy) -> tuple[float, int]:
        return max(slot.last_used_s, demand_last_used_s.get(slot.owner, slot.last_used_s)), slot.slot_id

    idle_serving = [
        s.slot_id for s in sorted(occupancy, key=lru_key) if s.kind is SlotKind.SERVING and not is_protected(s)
    ]
    evictions: dict[int, SlotEviction] = {}

    def take(pool: list[int], count: int, *, evict: bool = True) -> list[int]:
        taken, pool[:] = pool[:count], pool[count:]
        for slot_id in taken:
            if evict and slot_id in table:
                old = table[slot_id]
                evictions[slot_id] = SlotEviction(slot_id, old.kind, old.owner)
        return taken

    def claim(count: int) -> list[int]:
        # Cheapest first: empty slots, idle probe copies (worthless), then cached adapters, LRU.
        taken: list[int] = []
        for pool in (free, idle_probe, idle_serving):
            if len(taken) < count:
                taken += take(pool, count - len(taken))
        return taken

    # 1. Serving keys users wait for (most waiting first), then pinned double buffers.
    resident = {s.owner for s in occupancy if s.kind is SlotKind.SERVING}
    missing = sorted(
        (d for d in wanted.values() if d.adapter_key not in resident),
        key=lambda d: (-d.num_waiting, not d.is_pinned, -d.last_used_s, d.adapter_key),
    )
    loads: list[SlotLoad] = []
    deferred: list[str] = []
    for demand in missing:
        got = claim(1)
        if got:
            loads.append(SlotLoad(got[0], demand.adapter_key))
            table[got[0]] = SlotOccupancy(got[0], SlotKind.SERVING, demand.adapter_key, 0, demand.last_used_s)
        else:
            deferred.append(demand.adapter_key)

    # 2. Probe steps, all-or-nothing, in fair order.
    # Pinned keys hold their slots for good; everything else (in-flight requests, waiting users) drains.
    num_pinned = sum(1 for demand in wanted.values() if demand.is_pinned)
    max_probe_slots_ever = num_slots - num_pinned - num_reserved_serving_slots
    grants: list[ProbeGrant] = []
    blocked: list[tuple[str, JobStatus]] = []
    head_blocked = False
    for demand in probe_demands:
        own = sorted(slot_id for slot_id in idle_probe if table[slot_id].owner == demand.job_id)
        available = len(free) + len(idle_probe) + len(idle_serving) - num_reserved_serving_slots
        if demand.num_probe_slots > max_probe_slots_ever:
            blocked.append((demand.job_id, JobStatus.NEEDS_MORE_SLOTS_THAN_EXIST))  # skipped, blocks no one
        elif head_blocked:
            blocked.append((demand.job_id, JobStatus.BEHIND_BLOCKED_JOB))
        elif demand.num_probe_slots > available:
            blocked.append((demand.job_id, JobStatus.WAITING_FOR_SLOTS))
            head_blocked = True
        else:
            # A job's own idle probe slots are reused without an eviction: the step rewrites them anyway.
            own = take(own, demand.num_probe_slots, evict=False)
            idle_probe[:] = [slot_id for slot_id in idle_probe if slot_id not in own]
            got = own + claim(demand.num_probe_slots - len(own))
            for slot_id in got:
                table[slot_id] = SlotOccupancy(slot_id, SlotKind.PROBE, demand.job_id, 0, 0.0)
            grants.append(ProbeGrant(demand.job_id, tuple(sorted(got))))

    # 3. Idle probe copies nobody reused hold nothing of value: release them.
    for slot_id in take(idle_probe, len(idle_probe)):
        del table[slot_id]

    return SlotPlan(
        to_evict=tuple(sorted(evictions.values(), key=lambda e: e.slot_id)),
        to_load=tuple(loads),
        probe_grants=tuple(grants),
        blocked_jobs=tuple(blocked),
        deferred_adapter_keys=tuple(deferred),
        occupancy=tuple(table[slot_id] for slot_id in sorted(table)),
    )
