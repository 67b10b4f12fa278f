from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.planning import (
    ChunkRequest,
    ControllerConfig,
    JobDemand,
    JobStatus,
    LatencySignal,
    PlannerConfig,
    PlanningError,
    RoundObservation,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    initial_planner_state,
    percentile_ms,
    plan_round,
    refund_step,
)
from scheduler.planning.simulate import SimJob, SyntheticEngine, simulate

CONFIG = PlannerConfig(
    controller=ControllerConfig(target_ttft_ms=200.0, max_tokens_in_flight=32768, additive_increase_tokens=512),
    num_slots=16,
    num_reserved_serving_slots=1,
)
JOBS = [SimJob("a", 1.0, 6000, 4), SimJob("b", 2.0, 2000, 2), SimJob("c", 1.0, 4000, 2)]
ARRIVAL_ROUND = 40
TRAFFIC = [0] * ARRIVAL_ROUND + [1, 2] * 60 + [0] * 80  # the tail outlasts the controller's traffic memory


@pytest.fixture(scope="module")
def traffic_run():
    return simulate(CONFIG, SyntheticEngine(), JOBS, TRAFFIC)


def test_no_traffic_fills_the_engine(traffic_run):
    budgets = [record.budget_tokens for record in traffic_run.records[:ARRIVAL_ROUND]]
    assert budgets[-1] == CONFIG.controller.max_tokens_in_flight
    assert budgets.index(CONFIG.controller.max_tokens_in_flight) <= 8


def test_backs_off_within_a_few_rounds_when_users_arrive(traffic_run):
    max_tokens = CONFIG.controller.max_tokens_in_flight
    after = [record.budget_tokens for record in traffic_run.records[ARRIVAL_ROUND:]]
    assert after[1] <= max_tokens // 4  # the round after the first arrival: no full-width engine for users
    assert traffic_run.records[ARRIVAL_ROUND + 1].budget_reason == "users_arrived"


def test_users_stay_near_target_once_settled(traffic_run):
    window = traffic_run.user_ttft_ms_by_round[ARRIVAL_ROUND + 10 : ARRIVAL_ROUND + 120]
    settled = [ttft for ttfts in window for ttft in ttfts]
    assert percentile_ms(settled, 0.95) <= CONFIG.controller.target_ttft_ms


def test_training_keeps_going_next_to_users_and_refills_after(traffic_run):
    during = sum(record.num_tokens_admitted for record in traffic_run.records[ARRIVAL_ROUND + 10 : ARRIVAL_ROUND + 120])
    assert during > 0
    assert all(dict(traffic_run.tokens_scored_by_job)[job.job_id] > 0 for job in JOBS)
    assert traffic_run.records[-1].budget_tokens == CONFIG.controller.max_tokens_in_flight
    assert traffic_run.max_slots_in_use <= CONFIG.num_slots


@settings(max_examples=20, deadline=None, database=None)
@given(
    st.lists(st.integers(0, 4), min_size=20, max_size=80),
    st.lists(st.tuples(st.floats(0.2, 5.0), st.integers(200, 9000), st.integers(1, 6)), min_size=1, max_size=4),
    st.integers(4, 12),
)
def test_random_workloads_respect_slots_and_budget_bounds(arrivals, specs, num_slots):
    config = replace(CONFIG, num_slots=num_slots)
    jobs = [SimJob(f"j{i}", weight, step, slots) for i, (weight, step, slots) in enumerate(specs)]
    result = simulate(config, SyntheticEngine(), jobs, arrivals)
    assert result.max_slots_in_use <= num_slots
    for record in result.records:
        assert config.controller.min_tokens_in_flight <= record.budget_tokens <= config.controller.max_tokens_in_flight
        assert record.num_slots_serving + record.num_slots_probe + record.num_slots_free == num_slots


def observation(**overrides):
    fields = dict(
        now_s=10.0,
        latency=LatencySignal(ttft_p95_ms=80.0, num_user_running=2, num_user_tokens_in_flight=1000),
        num_probe_tokens_in_flight=0,
        jobs=(JobDemand("a", 1.0, 500, 2), JobDemand("b", 1.0, 500, 2, is_paused=True)),
        slots=(SlotOccupancy(0, SlotKind.SERVING, "base@3", 1, 9.0), SlotOccupancy(1, SlotKind.PROBE, "b", 0)),
        serving_demands=(ServingDemand("base@3", is_pinned=True), ServingDemand("other@1", num_waiting=1)),
    )
    fields.update(overrides)
    return RoundObservation(**fields)


def test_plan_and_record_for_one_round():
    config = replace(CONFIG, num_slots=4, num_reserved_serving_slots=0)
    state = initial_planner_state(config)
    state = replace(state, controller=replace(state.controller, budget_tokens=1000, had_user_traffic=True))
    plan = plan_round(config, state, observation())

    assert [(g.job_id, g.num_tokens) for g in plan.step_grants] == [("a", 500)]
    assert [load.adapter_key for load in plan.slots.to_load] == ["other@1"]  # the waiting user's adapter first
    assert [(e.slot_id, e.owner) for e in plan.slots.to_evict] == [(1, "b")]  # paused job's idle probe slot freed
    granted_slots = set(plan.step_grants[0].probe_slot_ids)
    assert len(granted_slots) == 2 and 0 not in granted_slots

    record = plan.record
    assert record.budget_tokens == plan.next_state.controller.budget_tokens
    assert record.measured_ttft_ms == 80.0 and record.target_ttft_ms == 200.0
    assert record.num_step_tokens_granted == 500 and record.num_tokens_admitted == 0  # chunks come next round
    assert record.train_token_share == 0.0 and record.serve_token_share == 1.0
    statuses = {job.job_id: job.status for job in record.jobs}
    assert statuses == {"a": JobStatus.GRANTED, "b": JobStatus.PAUSED}
    shares = {job.job_id: job.recent_token_share for job in record.jobs}
    assert shares == {"a": 1.0, "b": 0.0}
    assert (record.num_slots_serving, record.num_slots_probe, record.num_slots_free) == (2, 2, 0)


def test_chunks_enter_fifo_under_the_budget_and_the_head_blocks():
    state = initial_planner_state(CONFIG)
    state = replace(state, controller=replace(state.controller, budget_tokens=1000, had_user_traffic=True))
    chunks = (ChunkRequest(1, "a", 300), ChunkRequest(2, "b", 300), ChunkRequest(3, "a", 600), ChunkRequest(4, "b", 10))
    in_band = LatencySignal(ttft_p95_ms=170.0, num_user_running=2, num_user_tokens_in_flight=1000)  # budget holds
    plan = plan_round(CONFIG, state, observation(latency=in_band, num_probe_tokens_in_flight=100, chunk_requests=chunks))
    assert [c.request_id for c in plan.chunk_grants] == [1, 2]  # 100 + 300 + 300; 600 does not fit, 10 waits
    assert plan.record.num_tokens_admitted == 600 and plan.record.num_chunks_waiting == 2
    assert plan.record.train_token_share == pytest.approx(700 / 1700)
    alone = plan_round(CONFIG, state, observation(latency=in_band, chunk_requests=(ChunkRequest(9, "a", 5000),)))
    assert [c.request_id for c in alone.chunk_grants] == [9]  # bigger than the budget: enters alone
    behind = plan_round(
        CONFIG, state, observation(latency=in_band, num_probe_tokens_in_flight=10, chunk_requests=(ChunkRequest(9, "a", 5000),))
    )
    assert behind.chunk_grants == ()


def test_reserve_keeps_a_slot_for_users_from_probes():
    config = replace(CONFIG, num_slots=4, num_reserved_serving_slots=1)
    state = initial_planner_state(config)
    state = replace(state, controller=replace(state.controller, budget_tokens=1000, had_user_traffic=True))
    plan = plan_round(config, state, observation())
    assert plan.step_grants == ()
    assert {job.job_id: job.status for job in plan.record.jobs}["a"] is JobStatus.WAITING_FOR_SLOTS


def test_users_waiting_behind_probes_stop_new_grants_at_once():
    state = initial_planner_state(CONFIG)
    state = replace(state, controller=replace(state.controller, budget_tokens=20000, had_user_traffic=True))
    plan = plan_round(
        CONFIG,
        state,
        observation(
            latency=LatencySignal(ttft_p95_ms=150.0, num_user_running=2, num_user_waiting=3, max_user_wait_ms=150.0),
            num_probe_tokens_in_flight=12000,
            chunk_requests=(ChunkRequest(1, "a", 256),),
        ),
    )
    assert plan.record.budget_reason == "clamp_users_waiting"
    assert plan.record.budget_tokens <= 6000 and plan.chunk_grants == ()


def test_refund_gives_the_step_back():
    config = replace(CONFIG, num_slots=4, num_reserved_serving_slots=0)
    plan = plan_round(config, initial_planner_state(config), observation())
    before = {job.job_id: job for job in plan.next_state.fairness.jobs}["a"]
    refunded = refund_step(plan.next_state, plan.step_grants[0], weight=1.0)
    after = {job.job_id: job for job in refunded.fairness.jobs}["a"]
    assert after.num_tokens_granted_total == before.num_tokens_granted_total - 500
    assert after.virtual_start == before.virtual_start - 500


def test_bad_observation_names_the_field():
    with pytest.raises(PlanningError, match="jobs"):
        observation(jobs=(JobDemand("a", 1.0, 5, 1), JobDemand("a", 1.0, 5, 1)))
    with pytest.raises(PlanningError, match="num_probe_tokens_in_flight"):
        observation(num_probe_tokens_in_flight=-1)
    with pytest.raises(PlanningError, match="weight"):
        JobDemand("a", 0.0, 5, 1)
    with pytest.raises(PlanningError, match="num_reserved_serving_slots"):
        PlannerConfig(controller=CONFIG.controller, num_slots=2, num_reserved_serving_slots=2)


def test_no_chunk_enters_while_a_user_waits_for_its_first_token():
    state = initial_planner_state(CONFIG)
    state = replace(state, controller=replace(state.controller, budget_tokens=20000, had_user_traffic=True))
    chunk = (ChunkRequest(1, "a", 256),)
    waiting = LatencySignal(ttft_p95_ms=150.0, num_user_running=2, num_user_waiting=1, max_user_wait_ms=5.0)
    held = plan_round(CONFIG, state, observation(latency=waiting, chunk_requests=chunk))
    assert held.chunk_grants == () and held.record.num_chunks_waiting == 1
    assert held.record.budget_tokens == 20000  # a short wait is no reason to cut the budget
    served = LatencySignal(ttft_p95_ms=150.0, num_user_running=3)
    assert plan_round(CONFIG, state, observation(latency=served, chunk_requests=chunk)).chunk_grants == chunk
    off = replace(CONFIG, hold_chunks_while_users_wait=False)
    assert plan_round(off, state, observation(latency=waiting, chunk_requests=chunk)).chunk_grants == chunk


def test_a_job_whose_slots_serving_adapters_hold_does_not_hold_the_others_behind_its_share():
    config = replace(CONFIG, num_slots=6, num_reserved_serving_slots=0)
    serving = tuple(SlotOccupancy(i, SlotKind.SERVING, f"x@{i}", 1, 0.0) for i in range(4))  # busy served adapters
    demands = tuple(ServingDemand(f"x@{i}", is_pinned=True) for i in range(4))
    big, small = JobDemand("a", 1.0, 500, 4), JobDemand("b", 1.0, 500, 2)  # "a" sorts first: the smaller tag
    state = initial_planner_state(config)
    for _ in range(5):  # "b" steps again and again; "a" waits for the serving slots
        plan = plan_round(
            config, state, RoundObservation(0.0, LatencySignal(), 0, (big, small), serving, demands)
        )
        state = plan.next_state
        assert [grant.job_id for grant in plan.step_grants] == ["b"]
        statuses = {job.job_id: job.status for job in plan.record.jobs}
        assert statuses == {"a": JobStatus.NEEDS_MORE_SLOTS_THAN_EXIST, "b": JobStatus.GRANTED}
    # Once the serving slots are back, "a" rejoins at the current virtual time and goes first.
    plan = plan_round(config, state, RoundObservation(0.0, LatencySignal(), 0, (big, small)))
    assert [grant.job_id for grant in plan.step_grants] == ["a"]


def test_a_hold_gives_way_after_max_hold_under_sustained_waiting():
    config = replace(CONFIG, max_hold_s=0.25)
    state = initial_planner_state(config)
    state = replace(state, controller=replace(state.controller, budget_tokens=20000, had_user_traffic=True))
    waiting = LatencySignal(ttft_p95_ms=150.0, num_user_running=2, num_user_waiting=1, max_user_wait_ms=5.0)
    admitted_at = []
    for i in range(40):  # a fresh user is always waiting (each for 5 ms): 10 ms rounds for 0.4 s
        now = 10.0 + i * 0.01
        chunk = (ChunkRequest(i, "a", 128),)
        plan = plan_round(config, state, observation(now_s=now, latency=waiting, chunk_requests=chunk))
        state = plan.next_state
        if plan.chunk_grants:
            admitted_at.append(round(now - 10.0, 2))
    assert admitted_at and admitted_at[0] >= 0.25 - 1e-9  # held at first, then the trickle goes on
    assert len(admitted_at) <= 2  # ... and a new hold starts after each chunk that gave way
