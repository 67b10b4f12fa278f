"""The co-scheduler's view of the LoRA slots for one planning round: who holds each taken slot, as the
planner's `SlotOccupancy` and `ServingDemand` records.

A round runs at every event, and between two rounds the slots rarely change hands, so records are reused
while their content is the same instead of being rebuilt (and re-validated) each round.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from scheduler.planning import ServingDemand, SlotKind, SlotOccupancy

_CACHE_SIZE = 1024  # records kept for reuse; cleared when full


class SlotRecords:
    def __init__(self, slot_ids: tuple[int, ...]):
        self.slot_ids = slot_ids
        self._index = {slot: i for i, slot in enumerate(slot_ids)}
        self._occupancy: dict[tuple, SlotOccupancy] = {}  # (slot, kind, owner, in flight) → its record
        self._serving_demands: dict[str, ServingDemand] = {}

    def table(
        self,
        probe_owners: Mapping[int, str],
        serving: Iterable[tuple[int, str, int]],
        free: set[int],
        now: float,
    ) -> tuple[tuple[SlotOccupancy, ...], tuple[ServingDemand, ...]]:
        """Every taken slot: a job's probe slot (`probe_owners`: slot → job), a serving adapter's (`serving`:
        slot, owner key, requests in flight), or one the adapter host took and has not registered yet (never
        handed out: one owner per slot). Serving slots belong to the adapter host, which evicts idle adapters
        itself, so each serving owner is pinned for the planner."""
        serving_by_slot = {slot: (owner, in_flight) for slot, owner, in_flight in serving}
        slots = []
        for slot in self.slot_ids:
            if slot in free:
                continue
            if slot in probe_owners:
                slots.append(self._occupied(slot, SlotKind.PROBE, probe_owners[slot], 1, now))
            elif slot in serving_by_slot:
                owner, in_flight = serving_by_slot[slot]
                slots.append(self._occupied(slot, SlotKind.SERVING, owner, in_flight, now))
            else:
                slots.append(self._occupied(slot, SlotKind.SERVING, f"__reserved__#{slot}", 1, now))
        owners = sorted({s.owner for s in slots if s.kind is SlotKind.SERVING})
        return tuple(slots), tuple(self._pinned_demand(owner) for owner in owners)

    def _occupied(self, slot: int, kind: SlotKind, owner: str, in_flight: int, now: float) -> SlotOccupancy:
        """The slot's record: an earlier round's while its owner and requests in flight are the same. Its
        `last_used_s` is when that state was first seen; no LRU order reads it here (every serving slot is
        pinned for the planner, and probe slots are never evicted by age)."""
        key = (slot, kind, owner, in_flight)
        record = self._occupancy.get(key)
        if record is None:
            if len(self._occupancy) >= _CACHE_SIZE:
                self._occupancy.clear()
            record = self._occupancy[key] = SlotOccupancy(self._index[slot], kind, owner, in_flight, now)
        return record

    def _pinned_demand(self, owner: str) -> ServingDemand:
        demand = self._serving_demands.get(owner)
        if demand is None:
            if len(self._serving_demands) >= _CACHE_SIZE:
                self._serving_demands.clear()
            demand = self._serving_demands[owner] = ServingDemand(owner, is_pinned=True)
        return demand
