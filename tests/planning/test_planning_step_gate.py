import pytest
from hypothesis import given
from hypothesis import strategies as st

from scheduler.planning.records import PlanningError
from scheduler.planning.step_gate import StepGateConfig, StepView, num_admitted, step_allowance

GATE = StepGateConfig(probe_priority=10, tokens_with_users=256, tokens_with_user_prefill=32, user_memory_s=2.0)


def view(now_s=100.0, waiting=0, running=0, probe_running=0):
    return StepView(now_s=now_s, num_user_waiting=waiting, num_user_running=running, num_probe_tokens_running=probe_running)


def test_no_users_ever_means_no_limit():
    decision = step_allowance(GATE, view(), None)
    assert decision.allowance is None and decision.last_user_seen_s is None


def test_a_waiting_user_gets_the_prefill_allowance_and_running_users_the_step_allowance():
    assert step_allowance(GATE, view(waiting=1, running=3), None).allowance == 32
    assert step_allowance(GATE, view(running=3), None).allowance == 256


def test_running_probe_tokens_count_against_the_allowance():
    assert step_allowance(GATE, view(running=1, probe_running=200), None).allowance == 56
    assert step_allowance(GATE, view(running=1, probe_running=400), None).allowance == 0
    assert step_allowance(GATE, view(waiting=1, probe_running=40), None).allowance == 0


def test_users_are_remembered_for_user_memory_s_then_the_limit_lifts():
    seen = step_allowance(GATE, view(now_s=10.0, running=1), None)
    assert seen.last_user_seen_s == 10.0
    assert step_allowance(GATE, view(now_s=11.9), seen.last_user_seen_s).allowance == 256
    lifted = step_allowance(GATE, view(now_s=12.1), seen.last_user_seen_s)
    assert lifted.allowance is None and lifted.last_user_seen_s == 10.0


def test_admission_takes_whole_probes_in_order():
    assert num_admitted(None, [40] * 5) is None
    assert num_admitted(128, [40] * 5) == 3
    assert num_admitted(120, [40] * 5) == 3  # exactly full
    assert num_admitted(128, [40, 100, 10]) == 1  # no skipping ahead past a probe that does not fit
    assert num_admitted(0, [40] * 5) == 0
    assert num_admitted(128, []) == 0


def test_an_allowance_smaller_than_one_probe_still_admits_one():
    assert num_admitted(16, [40, 40]) == 1
    assert num_admitted(1, [300]) == 1


@given(st.integers(0, 2000), st.lists(st.integers(1, 400), max_size=50))
def test_admitted_tokens_never_exceed_the_allowance_except_one_lone_probe(allowance, queued):
    n = num_admitted(allowance, queued)
    used = sum(queued[:n])
    assert n <= len(queued)
    assert used <= allowance or (n == 1 and allowance > 0)
    if n < len(queued) and allowance > 0:  # it stopped because the next one would not fit (or it is full)
        assert used + queued[n] > allowance or used >= allowance


@pytest.mark.parametrize(
    "field, value",
    [("tokens_with_users", -1), ("tokens_with_user_prefill", 1.5), ("user_memory_s", float("nan")), ("probe_priority", "10")],
)
def test_bad_config_names_the_field(field, value):
    values = GATE.to_dict() | {field: value}
    with pytest.raises(PlanningError, match=field):
        StepGateConfig.from_dict(values)


def test_config_round_trips_through_a_dict():
    assert StepGateConfig.from_dict(GATE.to_dict()) == GATE
