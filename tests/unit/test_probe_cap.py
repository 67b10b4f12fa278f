"""The per-step probe cap: its shared word (engine/gate_cap.py), the pure gate with a cap, and the AIMD loop."""

from __future__ import annotations

import pytest

from scheduler.engine.gate_cap import GateCap
from scheduler.planning import LatencySignal
from scheduler.planning.step_gate import StepGateConfig, StepView, step_allowance
from scheduler.probe_cap_control import ProbeCapControl

GATE = StepGateConfig(probe_priority=10, tokens_with_users=256, tokens_with_user_prefill=0)


def test_the_word_is_shared_between_mappings(tmp_path):
    writer = GateCap.create(tmp_path / "cap")
    reader = GateCap.open(tmp_path / "cap")
    assert reader.read() is None  # nothing written: the static limit holds
    writer.write(96)
    assert reader.read() == 96
    writer.write(0)
    assert reader.read() == 0
    with pytest.raises(ValueError, match=">= 0"):
        writer.write(-5)
    writer.close()
    reader.close()


@pytest.mark.parametrize(("cap", "decoding", "prefill"), [(None, 256, 0), (64, 64, 0), (1000, 256, 0), (0, 0, 0)])
def test_the_cap_only_lowers_the_gates_limits(cap, decoding, prefill):
    decode_view = StepView(now_s=1.0, num_user_waiting=0, num_user_running=3, num_probe_tokens_running=0,
                           tokens_with_users_cap=cap)
    assert step_allowance(GATE, decode_view, None).allowance == decoding
    prefill_view = StepView(now_s=1.0, num_user_waiting=1, num_user_running=3, num_probe_tokens_running=0,
                            tokens_with_users_cap=cap)
    assert step_allowance(GATE, prefill_view, None).allowance == prefill
    idle = StepView(now_s=100.0, num_user_waiting=0, num_user_running=0, num_probe_tokens_running=0,
                    tokens_with_users_cap=cap)
    assert step_allowance(GATE, idle, None).allowance is None  # no users: no cap at all


def _latency(p95_ms: float | None, running: int = 4) -> LatencySignal:
    return LatencySignal(
        ttft_p95_ms=p95_ms, num_user_running=running, num_user_waiting=0, num_user_tokens_in_flight=40,
        seconds_since_user_arrival_s=0.01, max_user_wait_ms=0.0,
    )


def test_over_target_cuts_the_cap_and_under_target_grows_it_back():
    written: list[int] = []
    control = ProbeCapControl(target_ttft_ms=30.0, max_tokens=256, min_tokens=32, write=written.append)
    assert written == [256]  # starts at the static limit
    t = 0.0
    for _ in range(20):  # users' p95 twice the target: cut, at most once a second
        t += 0.25
        control.update(_latency(60.0), 2000, 4000, t)
    assert 32 <= control.cap_tokens < 64
    assert written[-1] == control.cap_tokens and len(written) == len(set(written))  # each value written once
    cuts = len(written)
    for _ in range(200):  # well under target: additive growth back to the static limit, never past it
        t += 0.1
        control.update(_latency(10.0), 2000, 4000, t)
    assert control.cap_tokens == 256 and len(written) > cuts


def test_the_cap_never_leaves_its_range():
    control = ProbeCapControl(target_ttft_ms=30.0, max_tokens=256, min_tokens=32, write=lambda _: None)
    t = 0.0
    for _ in range(100):
        t += 1.5
        control.update(_latency(500.0), 2000, 4000, t)
    assert control.cap_tokens == 32
    control.set_target_ttft_ms(1000.0)
    for _ in range(200):
        t += 0.1
        control.update(_latency(500.0), 2000, 4000, t)
    assert control.cap_tokens == 256


def test_the_runtime_drives_the_cap_only_when_asked(tmp_path):
    from types import SimpleNamespace

    from scheduler.coscheduler_config import CoSchedulerConfig
    from scheduler.runtime import _probe_cap_control

    cap = GateCap.create(tmp_path / "cap")
    binding = SimpleNamespace(gate_cap=cap, config=SimpleNamespace(step_gate=GATE))
    assert _probe_cap_control(binding, CoSchedulerConfig()) is None  # default: the static gate alone
    control = _probe_cap_control(binding, CoSchedulerConfig(target_ttft_ms=40.0, min_probe_tokens_per_step=32))
    assert control is not None and control.config.max_tokens_in_flight == GATE.tokens_with_users
    assert cap.read() == GATE.tokens_with_users  # written at once: the engine starts from the static limit
    assert _probe_cap_control(SimpleNamespace(gate_cap=None, config=binding.config),
                              CoSchedulerConfig(min_probe_tokens_per_step=32)) is None
    cap.close()
