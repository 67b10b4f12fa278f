from dataclasses import replace

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


class Clock:
    """Rounds one second apart by default: longer than every pacing interval of CONFIG."""

    def __init__(self, step_s=1.0):
        self.now_s, self.step_s = 0.0, step_s

    def __call__(self):
        self.now_s += self.step_s
        return self.now_s


def run(config, state, signals, in_flight=BUSY, clock=None):
    clock = clock or Clock()
    budgets = []
    for signal in signals:
        state = update_budget(config, state, signal, min(in_flight, state.budget_tokens), BUSY, clock())
        budgets.append(state.budget_tokens)
    return state, budgets


def users(ttft_ms, waiting=0, wait_ms=0.0):
    return LatencySignal(
        ttft_p95_ms=ttft_ms, num_user_running=4, num_user_waiting=waiting, max_user_wait_ms=wait_ms
    )


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
    full = full_with_users()
    _, budgets = run(CONFIG, full, [users(400.0)] * 8)
    assert budgets[-1] < full.budget_tokens / 8
    assert all(later <= earlier for earlier, later in zip(budgets, budgets[1:]))
    assert min(budgets) >= CONFIG.min_tokens_in_flight


def full_with_users():
    """At max after an idle spell, with users already present (past the arrival restart)."""
    full, _ = run(CONFIG, initial_controller_state(CONFIG), [LatencySignal()] * 10)
    return replace(full, had_user_traffic=True)


def test_users_arriving_after_idle_meet_the_budget_users_last_had():
    state, _ = run(CONFIG, initial_controller_state(CONFIG), [users(150.0)] * 3)  # users, budget held in band
    with_users = state.budget_tokens
    idle, _ = run(CONFIG, state, [LatencySignal()] * 10)
    assert idle.budget_tokens == CONFIG.max_tokens_in_flight
    back = update_budget(CONFIG, idle, users(None), BUSY, BUSY, 100.0)
    assert back.last_reason is BudgetReason.USERS_ARRIVED and back.budget_tokens == with_users


def test_backs_off_within_a_few_rounds_when_users_arrive():
    full = full_with_users()
    _, budgets = run(CONFIG, full, [users(260.0)] * 3)
    assert budgets[0] <= full.budget_tokens // 2  # first over-target round already cuts
    _, clamped = run(CONFIG, full, [users(150.0, waiting=3, wait_ms=150.0)], in_flight=6000)
    assert clamped[0] <= 3000  # a user kept waiting behind probes: cut from what is in flight, no cooldown
    _, normal = run(CONFIG, full, [users(150.0, waiting=3, wait_ms=20.0)], in_flight=6000)
    assert normal[0] == full.budget_tokens  # waiting a few ms for the next forward is not a signal


def test_growth_is_paced_in_time_not_rounds():
    fast = Clock(step_s=0.001)  # a busy loop plans a round every millisecond
    state, budgets = run(CONFIG, initial_controller_state(CONFIG), [users(50.0)] * 1000, clock=fast)
    num_increases = sum(1 for a, b in zip(budgets, budgets[1:]) if b > a)
    assert num_increases <= 1.0 / CONFIG.increase_interval_s + 1  # one second of rounds
    over, cuts = run(CONFIG, state, [users(400.0)] * 1000, clock=fast)
    assert sum(1 for a, b in zip(cuts, cuts[1:]) if b < a) <= 1 / CONFIG.decrease_interval_s + 1


def test_a_gap_between_user_arrivals_is_not_idleness():
    full, _ = run(CONFIG, initial_controller_state(CONFIG), [users(260.0)] * 6)
    gap = LatencySignal(ttft_p95_ms=150.0, seconds_since_user_arrival_s=0.4)
    state = update_budget(CONFIG, full, gap, BUSY, BUSY, 100.0)
    assert state.last_reason is not BudgetReason.IDLE_GROW
    gone = LatencySignal(ttft_p95_ms=150.0, seconds_since_user_arrival_s=CONFIG.user_traffic_memory_s + 1)
    state = update_budget(CONFIG, full, gone, BUSY, BUSY, 100.0)
    assert state.last_reason is BudgetReason.IDLE_GROW


def test_cut_is_harsher_the_further_over_target():
    full = full_with_users()
    mild = update_budget(CONFIG, full, users(220.0), BUSY, BUSY, 100.0).budget_tokens
    harsh = update_budget(CONFIG, full, users(2000.0), BUSY, BUSY, 100.0).budget_tokens
    assert harsh < mild <= full.budget_tokens * CONFIG.decrease_factor


def test_trend_term_holds_before_crossing_target():
    state = update_budget(CONFIG, initial_controller_state(CONFIG), users(60.0), BUSY, BUSY, 1.0)
    state = update_budget(CONFIG, state, users(140.0), BUSY, BUSY, 2.0)  # +80/round: next round would be 220
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
            st.floats(0, 2000),
            st.floats(0, 0.5),
        ),
        max_size=60,
    )
)
def test_budget_never_leaves_floor_and_max(rounds):
    state = initial_controller_state(CONFIG)
    now_s = 0.0
    for ttft, running, waiting, in_flight, wanted, wait_ms, dt_s in rounds:
        now_s += dt_s
        signal = LatencySignal(
            ttft_p95_ms=ttft, num_user_running=running, num_user_waiting=waiting, max_user_wait_ms=wait_ms
        )
        state = update_budget(CONFIG, state, signal, in_flight, wanted, now_s)
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
