"""Many rounds of random serving and training traffic, applying each plan to a slot table like the loop would."""

from dataclasses import replace

from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.planning import (
    ControllerConfig,
    JobDemand,
    LatencySignal,
    PlannerConfig,
    RoundObservation,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    initial_planner_state,
    plan_round,
)

KEYS = ["base@1", "a@1", "a@2", "b@7", "c@1", "d@4"]
ROUND = st.tuples(
    st.lists(st.sampled_from(KEYS), max_size=3),  # new user requests by adapter key
    st.integers(0, 3),  # user requests that finish this round (oldest first)
    st.booleans(),  # do probe steps in flight finish this round
)


@settings(max_examples=60, deadline=None, database=None)
@given(
    st.integers(3, 8),
    st.lists(st.tuples(st.floats(0.5, 3.0), st.integers(1, 4)), min_size=1, max_size=3),
    st.lists(ROUND, min_size=5, max_size=40),
)
def test_slot_table_stays_consistent_over_rounds(num_slots, job_specs, rounds):
    config = PlannerConfig(
        controller=ControllerConfig(target_ttft_ms=100.0, max_tokens_in_flight=10000), num_slots=num_slots
    )
    state = initial_planner_state(config)
    table: dict[int, SlotOccupancy] = {}
    running: list[str] = []  # adapter key of each user request in flight
    waiting: list[str] = []  # user requests held back until their key has a slot
    steps: dict[str, int] = {}  # job_id -> tokens in flight
    jobs = [JobDemand(f"j{i}", weight, 1000, slots) for i, (weight, slots) in enumerate(job_specs)]

    for now, (arrivals, num_finished, steps_finish) in enumerate(rounds):
        running = running[num_finished:]
        if steps_finish:
            steps.clear()
        waiting += arrivals
        # The loop's view of the slots: in-flight counts per slot, from its own request bookkeeping.
        for slot_id, slot in list(table.items()):
            if slot.kind is SlotKind.SERVING:
                table[slot_id] = replace(slot, num_in_flight=running.count(slot.owner))
            else:
                table[slot_id] = replace(slot, num_in_flight=int(slot.owner in steps))
        demands = tuple(
            ServingDemand(key, num_waiting=waiting.count(key), is_pinned=key == "base@1", last_used_s=float(now))
            for key in sorted(set(waiting) | {"base@1"})
        )
        observation = RoundObservation(
            now_s=float(now),
            latency=LatencySignal(num_user_running=len(running)),
            num_probe_tokens_in_flight=sum(steps.values()),
            jobs=tuple(replace(job, has_step_in_flight=job.job_id in steps) for job in jobs),
            slots=tuple(table[slot_id] for slot_id in sorted(table)),
            serving_demands=demands,
        )
        plan = plan_round(config, state, observation)
        state = plan.next_state

        for eviction in plan.slots.to_evict:
            assert table[eviction.slot_id].num_in_flight == 0, "evicted a slot in use"
            assert (table[eviction.slot_id].kind, table[eviction.slot_id].owner) == (eviction.kind, eviction.owner)
            del table[eviction.slot_id]
        for load in plan.slots.to_load:
            assert load.slot_id not in table, "loaded into an occupied slot"
            table[load.slot_id] = SlotOccupancy(load.slot_id, SlotKind.SERVING, load.adapter_key, 0, float(now))
        for grant in plan.step_grants:
            for slot_id in grant.probe_slot_ids:
                if slot_id in table:  # only the job's own idle probe slot may be reused without an eviction
                    assert (table[slot_id].kind, table[slot_id].owner) == (SlotKind.PROBE, grant.job_id)
                table[slot_id] = SlotOccupancy(slot_id, SlotKind.PROBE, grant.job_id, 1)
            steps[grant.job_id] = grant.num_tokens
        assert {slot.slot_id: slot for slot in plan.slots.occupancy}.keys() == table.keys()
        assert len(table) <= num_slots and all(0 <= slot_id < num_slots for slot_id in table)

        # Submit the waiting requests whose adapter is now resident: every running adapter has a slot.
        resident = {slot.owner for slot in table.values() if slot.kind is SlotKind.SERVING}
        running += [key for key in waiting if key in resident]
        waiting = [key for key in waiting if key not in resident]
        assert set(running) <= resident
        assert set(waiting) <= set(plan.slots.deferred_adapter_keys) | resident
