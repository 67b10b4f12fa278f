import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.planning import (
    JobStatus,
    PlanningError,
    ProbeDemand,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    plan_slots,
)

KEYS = [f"ad{i}@{v}" for i in range(4) for v in (1, 2)]
JOBS = [f"job{i}" for i in range(5)]


def serving(slot_id, key, in_flight=0, last_used_s=0.0):
    return SlotOccupancy(slot_id, SlotKind.SERVING, key, in_flight, last_used_s)


def probe(slot_id, job_id, in_flight=0):
    return SlotOccupancy(slot_id, SlotKind.PROBE, job_id, in_flight)


def test_idle_serving_adapters_are_evicted_least_recently_used_first():
    occupancy = [serving(0, "a@1", last_used_s=5.0), serving(1, "b@1", last_used_s=1.0), serving(2, "c@1", 0, 3.0)]
    plan = plan_slots(3, occupancy, [ServingDemand("d@1", num_waiting=2)], [])
    assert plan.to_load[0].slot_id == 1 and plan.to_load[0].adapter_key == "d@1"
    assert [e.owner for e in plan.to_evict] == ["b@1"]


def test_slot_with_requests_in_flight_is_never_evicted_and_demand_is_deferred():
    occupancy = [serving(0, "a@1", in_flight=1), serving(1, "b@1", in_flight=3)]
    plan = plan_slots(2, occupancy, [ServingDemand("c@1", num_waiting=1)], [ProbeDemand("job0", 1)])
    assert plan.to_evict == () and plan.to_load == () and plan.probe_grants == ()
    assert plan.deferred_adapter_keys == ("c@1",)
    assert plan.blocked_jobs == (("job0", JobStatus.WAITING_FOR_SLOTS),)


def test_probe_grant_is_all_or_nothing_and_nobody_overtakes():
    plan = plan_slots(4, [serving(0, "a@1", 1)], [], [ProbeDemand("big", 4), ProbeDemand("small", 1)])
    assert plan.probe_grants == ()  # big needs 4 of the 3 free slots; small waits behind it
    assert dict(plan.blocked_jobs) == {"big": JobStatus.WAITING_FOR_SLOTS, "small": JobStatus.BEHIND_BLOCKED_JOB}


def test_job_that_can_never_fit_is_skipped_without_blocking():
    demands = [ServingDemand("a@1", is_pinned=True), ServingDemand("a@2", is_pinned=True)]
    plan = plan_slots(4, [serving(0, "a@1"), serving(1, "a@2")], demands, [ProbeDemand("big", 3), ProbeDemand("ok", 2)])
    assert [g.job_id for g in plan.probe_grants] == ["ok"]
    assert dict(plan.blocked_jobs) == {"big": JobStatus.NEEDS_MORE_SLOTS_THAN_EXIST}


def test_reserve_keeps_slots_for_serving():
    plan = plan_slots(4, [], [], [ProbeDemand("job0", 4)], num_reserved_serving_slots=1)
    assert plan.probe_grants == ()
    plan = plan_slots(4, [], [], [ProbeDemand("job0", 3)], num_reserved_serving_slots=1)
    assert plan.probe_grants[0].slot_ids == (0, 1, 2)


def test_idle_probe_slots_are_reused_by_their_job_and_released_otherwise():
    occupancy = [probe(0, "job0"), probe(1, "job0"), probe(2, "job1"), probe(3, "job1", in_flight=1)]
    plan = plan_slots(5, occupancy, [], [ProbeDemand("job0", 2)])
    assert plan.probe_grants[0].slot_ids == (0, 1)
    assert [(e.slot_id, e.owner) for e in plan.to_evict] == [(2, "job1")]  # idle copy released, busy one kept


def test_inconsistent_observation_names_the_field():
    with pytest.raises(PlanningError, match="occupancy"):
        plan_slots(2, [serving(0, "a@1"), serving(0, "b@1")], [], [])
    with pytest.raises(PlanningError, match="occupancy"):
        plan_slots(2, [serving(5, "a@1")], [], [])
    with pytest.raises(PlanningError, match="occupancy"):
        plan_slots(2, [serving(0, "a@1"), serving(1, "a@1")], [], [])


@st.composite
def slot_worlds(draw):
    num_slots = draw(st.integers(1, 10))
    slot_ids = draw(st.lists(st.integers(0, num_slots - 1), unique=True, max_size=num_slots))
    keys = draw(st.permutations(KEYS))
    occupancy = []
    for index, slot_id in enumerate(slot_ids):
        in_flight = draw(st.sampled_from([0, 0, 1, 3]))
        if draw(st.booleans()) and index < len(keys):
            occupancy.append(serving(slot_id, keys[index], in_flight, draw(st.floats(0, 100))))
        else:
            occupancy.append(probe(slot_id, draw(st.sampled_from(JOBS)), in_flight))
    demands = [
        ServingDemand(key, num_waiting=draw(st.integers(0, 2)), is_pinned=draw(st.booleans()))
        for key in draw(st.lists(st.sampled_from(KEYS), unique=True, max_size=5))
    ]
    probes = [ProbeDemand(job, draw(st.integers(1, 4))) for job in draw(st.lists(st.sampled_from(JOBS), unique=True))]
    reserve = draw(st.integers(0, 2))
    return num_slots, occupancy, demands, probes, reserve


@settings(max_examples=300, deadline=None, database=None)
@given(slot_worlds())
def test_slot_invariants_under_random_workloads(world):
    num_slots, occupancy, demands, probes, reserve = world
    plan = plan_slots(num_slots, occupancy, demands, probes, reserve)
    after = {slot.slot_id: slot for slot in plan.occupancy}
    before = {slot.slot_id: slot for slot in occupancy}

    # Never more than num_slots; each slot holds one thing; each adapter key sits in one slot.
    assert len(plan.occupancy) <= num_slots and all(0 <= slot_id < num_slots for slot_id in after)
    resident = [s.owner for s in plan.occupancy if s.kind is SlotKind.SERVING]
    assert len(resident) == len(set(resident))
    # A slot with requests in flight is never evicted or changed.
    evicted = {e.slot_id for e in plan.to_evict}
    for slot in occupancy:
        if slot.num_in_flight > 0:
            assert slot.slot_id not in evicted and after[slot.slot_id] == slot
    assert evicted <= set(before)
    # Loads only land on slots that were free or evicted this round.
    for load in plan.to_load:
        assert load.slot_id not in before or load.slot_id in evicted
    # Grants: exactly the asked number of slots, disjoint, and nothing granted behind a job waiting for slots.
    wanted_slots = {d.job_id: d.num_probe_slots for d in probes}
    granted = [slot_id for g in plan.probe_grants for slot_id in g.slot_ids]
    assert len(granted) == len(set(granted))
    for grant in plan.probe_grants:
        assert len(grant.slot_ids) == wanted_slots[grant.job_id]
        for slot_id in grant.slot_ids:
            assert (after[slot_id].kind, after[slot_id].owner) == (SlotKind.PROBE, grant.job_id)
    order = [d.job_id for d in probes]
    blocked_at = [order.index(job) for job, why in plan.blocked_jobs if why is JobStatus.WAITING_FOR_SLOTS]
    if blocked_at:
        assert all(order.index(g.job_id) < blocked_at[0] for g in plan.probe_grants)
    # Every adapter users wait for or pinned is resident unless deferred; pinned residents are never evicted.
    for demand in demands:
        if demand.is_pinned or demand.num_waiting:
            assert (demand.adapter_key in resident) != (demand.adapter_key in plan.deferred_adapter_keys)
            if demand.adapter_key in plan.deferred_adapter_keys:
                # deferred only when nothing could be reclaimed: every slot is busy or protected
                assert len(plan.occupancy) == num_slots
    pinned = {d.adapter_key for d in demands if d.is_pinned}
    assert not any(e.owner in pinned and e.kind is SlotKind.SERVING for e in plan.to_evict)
    # Probes leave the serving reserve reclaimable.
    if plan.probe_grants:
        wanted = {d.adapter_key for d in demands if d.is_pinned or d.num_waiting}
        reclaimable = num_slots - len(plan.occupancy) + sum(
            1 for s in plan.occupancy if s.num_in_flight == 0 and s.kind is SlotKind.SERVING and s.owner not in wanted
        )
        assert reclaimable >= reserve


def test_lru_uses_the_fresher_of_slot_and_demand_last_use():
    occupancy = [serving(0, "a@1", last_used_s=1.0), serving(1, "b@1", last_used_s=2.0)]
    demands = [ServingDemand("a@1", last_used_s=9.0), ServingDemand("c@1", num_waiting=1)]
    plan = plan_slots(2, occupancy, demands, [])
    assert [e.owner for e in plan.to_evict] == ["b@1"]
