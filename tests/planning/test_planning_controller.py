import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from scheduler.planning import (
    BudgetReason,
    ControllerConfig,
    LatencySignal,
    PlanningError,
    initial_controller_state,
    percentile_ms,
    update_budget,
)

CONFIG = ControllerConfig(target_ttft_ms=200.0, max_tokens_in_flight=16384, min_tokens_in_flight=256)
BUSY = 10**9  # demand far above any budget: the budget is what limits ZO


def run(config, state, signals, in_flight=BUSY):
    budgets = []
    for signal in signals:
        state = update_budget(config, state, signal, min(in_flight, state.budget_tokens), BUSY)
        budgets.append(state.budget_tokens)
    return state, budgets


def users(ttft_ms, waiting=0):
    return LatencySignal(ttft_p95_ms=ttft_ms, num_user_running=4, num_user_waiting=waiting)


def test_no_traffic_fills_to_max_in_a_few_rounds():
    state, budgets = run(CONFIG, initial_controller_state(CONFIG), [LatencySignal()] * 12)
    assert budgets[-1] == CONFIG.max_tokens_in_flight
    assert budgets.index(CONFIG.max_tokens_in_flight) <= 8  # slow start doubles
    assert state.last_reason is BudgetReason.HOLD_AT_MAX


def test_no_traffic_ignores_a_stale_latency_window():
    state, budgets = run(CONFIG, initial_controller_state(CONFIG), [LatencySignal(ttft_p95_ms=900.0)] * 12)
    assert budgets[-1] == CONFIG.max_tokens_in_flight


def test_grows_while_under_target_and_holds_in_the_band():
    state = initial_controller_state(CONFIG)
    _, budgets = run(CONFIG, state, [users(100.0)] * 5)
    assert all(later > earlier for earlier, later in zip(budgets, budgets[1:]))
    _, held = run(CONFIG, update_budget(CONFIG, state, users(100.0), 0, BUSY), [users(180.0)] * 5)
    assert len(set(held)) == 1  # 180 ms is inside [0.8 x target, target]: hysteresis holds


def test_shrinks_while_over_target():
    full, _ = run(CONFIG, initial_controller_state(CONFIG), [LatencySignal()] * 10)
    _, budgets = run(CONFIG, full, [users(400.0)] * 8)
    assert budgets[-1] < full.budget_tokens / 8
    assert all(later <= earlier for earlier, later in zip(budgets, budgets[1:]))
    assert min(budgets) >= CONFIG.min_tokens_in_flight


def test_backs_off_within_a_few_rounds_when_users_arrive():
    full, _ = run(CONFIG, initial_controller_state(CONFIG), [LatencySignal()] * 10)
    _, budgets = run(CONFIG, full, [users(260.0)] * 3)
    assert budgets[0] <= full.budget_tokens // 2  # first over-target round already cuts
    _, clamped = run(CONFIG, full, [users(150.0, waiting=3)], in_flight=6000)
    assert clamped[0] <= 3000  # users queued behind probes: cut from what is in flight, no cooldown


def test_cut_is_harsher_the_further_over_target():
    full, _ = run(CONFIG, initial_controller_state(CONFIG), [LatencySignal()] * 10)
    mild = update_budget(CONFIG, full, users(220.0), BUSY, BUSY).budget_tokens
    harsh = update_budget(CONFIG, full, users(2000.0), BUSY, BUSY).budget_tokens
    assert harsh < mild <= full.budget_tokens * CONFIG.decrease_factor


def test_trend_term_holds_before_crossing_target():
    state = update_budget(CONFIG, initial_controller_state(CONFIG), users(60.0), BUSY, BUSY)
    state = update_budget(CONFIG, state, users(140.0), BUSY, BUSY)  # +80/round: next round would be 220
    assert state.last_reason is BudgetReason.HOLD_TREND


def test_no_growth_while_the_budget_is_not_what_limits_zo():
    state = initial_controller_state(CONFIG)
    state = update_budget(CONFIG, state, users(50.0), 0, 10)
    assert state.last_reason is BudgetReason.HOLD_UNDERUSED


@settings(max_examples=150, deadline=None, database=None)
@given(
    st.lists(
        st.tuples(
            st.one_of(st.none(), st.floats(0, 5000)),
            st.integers(0, 8),
            st.integers(0, 8),
            st.integers(0, 40000),
            st.integers(0, 40000),
        ),
        max_size=60,
    )
)
def test_budget_never_leaves_floor_and_max(rounds):
    state = initial_controller_state(CONFIG)
    for ttft, running, waiting, in_flight, wanted in rounds:
        signal = LatencySignal(ttft_p95_ms=ttft, num_user_running=running, num_user_waiting=waiting)
        state = update_budget(CONFIG, state, signal, in_flight, wanted)
        assert CONFIG.min_tokens_in_flight <= state.budget_tokens <= CONFIG.max_tokens_in_flight


def test_bad_config_names_the_field():
    with pytest.raises(PlanningError, match="min_tokens_in_flight"):
        ControllerConfig(target_ttft_ms=100.0, max_tokens_in_flight=10, min_tokens_in_flight=20)
    with pytest.raises(ValueError, match="target_ttft_ms"):
        ControllerConfig(target_ttft_ms=0.0, max_tokens_in_flight=10)
    with pytest.raises(ValueError, match="num_user_waiting"):
        LatencySignal(num_user_waiting=-1)


def test_percentile_nearest_rank():
    assert percentile_ms([], 0.95) is None
    assert percentile_ms([float(x) for x in range(1, 101)], 0.95) == 95.0
    assert percentile_ms([7.0], 0.5) == 7.0
