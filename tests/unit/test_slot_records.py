"""The co-scheduler's slot table for a round: every taken slot has one owner, unregistered slots are never
handed out, serving owners are pinned, and unchanged slots keep their records between rounds."""

from __future__ import annotations

from scheduler.planning import SlotKind
from scheduler.slot_records import SlotRecords


def test_each_taken_slot_is_a_probe_a_serving_or_a_reserved_slot():
    records = SlotRecords((3, 4, 5, 6, 7))
    slots, demands = records.table({4: "job-a"}, [(5, "users-a#0", 2)], free={3}, now=1.0)
    by_index = {s.slot_id: s for s in slots}
    assert sorted(by_index) == [1, 2, 3, 4]  # slot ids 4..7: their positions in the slot list
    assert (by_index[1].kind, by_index[1].owner) == (SlotKind.PROBE, "job-a")
    assert (by_index[2].kind, by_index[2].owner, by_index[2].num_in_flight) == (SlotKind.SERVING, "users-a#0", 2)
    # Taken by the adapter host and not registered yet: held under a name no request can claim.
    assert {by_index[3].owner, by_index[4].owner} == {"__reserved__#6", "__reserved__#7"}
    assert all(d.is_pinned for d in demands)
    assert sorted(d.adapter_key for d in demands) == ["__reserved__#6", "__reserved__#7", "users-a#0"]


def test_records_are_reused_while_the_slot_is_unchanged_and_rebuilt_when_it_changes():
    records = SlotRecords((1, 2))
    first, _ = records.table({}, [(1, "users-a#0", 1)], free={2}, now=1.0)
    again, _ = records.table({}, [(1, "users-a#0", 1)], free={2}, now=2.0)
    assert again[0] is first[0] and again[0].last_used_s == 1.0
    busier, _ = records.table({}, [(1, "users-a#0", 3)], free={2}, now=3.0)
    assert busier[0] is not first[0]
    assert (busier[0].num_in_flight, busier[0].last_used_s) == (3, 3.0)
