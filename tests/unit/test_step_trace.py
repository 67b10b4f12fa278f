"""The engine step trace: what the engine-core scheduler writes per step, and the benchmark's per-phase summary."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from scheduler.engine.step_trace import TRACE_ENV, StepRecord, StepTracer, read_step_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from coserve_parts.steps import load_steps, step_kind, summarise_steps  # noqa: E402
from coserve_parts.windows import Windows  # noqa: E402

PROBE = 10


def _request(priority: int) -> SimpleNamespace:
    return SimpleNamespace(priority=priority)


def _output(scheduled: dict[str, int], new_ids: list[str]) -> SimpleNamespace:
    return SimpleNamespace(
        num_scheduled_tokens=scheduled, scheduled_new_reqs=[SimpleNamespace(req_id=i) for i in new_ids]
    )


def test_off_without_the_environment_variable(monkeypatch):
    monkeypatch.delenv(TRACE_ENV, raising=False)
    assert StepTracer.from_env(PROBE) is None


def test_a_step_is_written_with_what_it_carried(monkeypatch, tmp_path):
    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "trace" / "core"))
    tracer = StepTracer.from_env(PROBE)
    requests = {"u1": _request(0), "u2": _request(0), "p1": _request(PROBE), "p2": _request(PROBE + 1)}
    # u1 decodes one token, u2 is prefilled (new), two probes carry 20 and 30 tokens; a user and a probe wait.
    tracer.scheduled(100.0, _output({"u1": 1, "u2": 28, "p1": 20, "p2": 30}, ["u2", "p1", "p2"]), requests,
                     [_request(0), _request(PROBE)])
    tracer.updated(100.012)
    tracer.scheduled(100.013, _output({"u1": 1, "u2": 1}, []), requests, [])  # not updated yet: not written
    files = list((tmp_path / "trace").glob("core.*.tsv"))
    assert len(files) == 1
    (step,) = read_step_trace(files[0])
    assert (step.probe_tokens, step.num_probes, step.user_tokens) == (50, 2, 29)
    assert (step.num_user_prefills, step.num_user_waiting, step.num_waiting) == (1, 1, 2)
    assert (step.schedule_start_s, step.update_start_s) == (100.0, 100.012)
    assert step_kind(step) == "user_prefill"


def test_a_file_that_is_not_a_trace_is_refused(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_text("a\tb\n1\t2\n")
    with pytest.raises(ValueError, match="not a step trace"):
        read_step_trace(path)


def _step(start: float, forward_ms: float, probe_tokens=0, user_tokens=0, prefills=0) -> StepRecord:
    return StepRecord(start, start + 0.0001, start + 0.0001 + forward_ms / 1000, start + 0.0002 + forward_ms / 1000,
                      probe_tokens, probe_tokens // 20, user_tokens, prefills, 0, 0)


def test_phase_summary_splits_steps_by_kind_and_time():
    steps, t = [], 10.0
    for i in range(40):  # alternating: a 5 ms decode-only step, a 15 ms decode step with 200 probe tokens
        if i % 2 == 0:
            steps.append(_step(t, 4.5, user_tokens=4))
            t += 0.005
        else:
            steps.append(_step(t, 14.5, probe_tokens=200, user_tokens=4))
            t += 0.015
    steps.append(_step(t, 1.0, user_tokens=1))  # ends the last period
    summary = summarise_steps(steps, Windows.of(10.0, t))
    assert summary["num_steps"] == 40
    assert summary["decode_only"]["share_of_steps"] == pytest.approx(0.5)
    assert summary["decode_and_probes"]["share_of_time"] == pytest.approx(0.75)
    assert summary["decode_and_probes"]["period_p50_ms"] == pytest.approx(15.0)
    assert summary["decode_and_probes"]["probe_tokens_mean"] == 200
    assert "user_prefill" not in summary
    # A window holding only the second half counts only its steps.
    assert summarise_steps(steps, Windows.of(10.2, t))["num_steps"] < 40


def test_phase_summary_over_several_windows_cuts_periods_at_each_windows_end():
    """A phase measured in rounds: steps of both windows count, and the last step of the first window does not
    carry the gap until the engine's next step (the other phases' time in between) as its period."""
    steps = [_step(10.0 + 0.01 * i, 9.0, probe_tokens=100, user_tokens=2) for i in range(10)]  # 10 ms steps
    steps += [_step(20.0 + 0.01 * i, 9.0, user_tokens=2) for i in range(11)]  # 9.9 s later: decode-only steps
    summary = summarise_steps(steps, Windows.of(10.0, 10.1).add(20.0, 20.1))
    assert summary["num_steps"] == 20
    assert summary["decode_and_probes"]["share_of_time"] == pytest.approx(0.5)
    assert summary["decode_and_probes"]["period_p99_ms"] == pytest.approx(10.0)  # not 9.9 s
    assert summary["steps_per_s"] == pytest.approx(100.0)


def test_load_steps_merges_files_in_time_order(tmp_path):
    for pid_start in (200.0, 100.0):
        tracer = StepTracer(open(tmp_path / f"core.{int(pid_start)}.tsv", "w", buffering=1), PROBE)
        tracer.scheduled(pid_start, _output({"p": 20}, ["p"]), {"p": _request(PROBE)}, [])
        tracer.updated(pid_start + 0.01)
    steps = load_steps(str(tmp_path / "core"))
    assert [s.schedule_start_s for s in steps] == [100.0, 200.0]
