"""The engine step trace: what the engine-core scheduler writes per step, and the benchmark's per-phase summary."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from scheduler.engine.step_trace import COLUMNS, TRACE_ENV, StepRecord, StepTracer, read_step_trace

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from coserve_parts.steps import load_steps, probe_idle, step_kind, summarise_steps  # noqa: E402
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


class _Counted:
    """A waiting request that counts how often the tracer reads its priority (vLLM's queue compares them too)."""

    reads = 0

    def __init__(self, priority: int, arrival: float) -> None:
        self._priority, self.arrival = priority, arrival

    @property
    def priority(self) -> int:
        _Counted.reads += 1
        return self._priority

    def __lt__(self, other) -> bool:
        return (self._priority, self.arrival) < (other._priority, other.arrival)


def test_users_waiting_are_counted_without_walking_the_probes_behind_them(monkeypatch, tmp_path):
    """vLLM's priority queue pops a heap copy to iterate; the count stops at the first probe instead of sorting
    every waiting probe each step. A plain iterable (vLLM's FCFS queue) is still counted in full."""
    from vllm.v1.core.sched.request_queue import PriorityRequestQueue

    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "core"))
    tracer = StepTracer.from_env(PROBE)
    queue = PriorityRequestQueue()
    for i in range(200):
        queue.add_request(_Counted(PROBE, float(i)))
    for i in range(3):
        queue.add_request(_Counted(0, 1000.0 + i))
    _Counted.reads = 0
    tracer.scheduled(1.0, _output({}, []), {}, queue)
    tracer.updated(1.01)
    assert _Counted.reads <= 4  # three users and the first probe, not 203 requests
    unordered = [_Counted(PROBE, 0.0), _Counted(0, 1.0), _Counted(PROBE, 2.0), _Counted(0, 3.0)]
    tracer.scheduled(2.0, _output({}, []), {}, unordered)
    tracer.updated(2.01)
    tracer.close()
    steps = read_step_trace(next(tmp_path.glob("core.*.tsv")))
    assert [(s.num_user_waiting, s.num_waiting) for s in steps] == [(3, 203), (2, 4)]


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


def test_phase_summary_shows_the_engine_out_of_work_and_its_gc_stalls():
    """ZO alone: a 20 ms probe step, then a step that scheduled nothing and the engine's 10 ms wait for the next
    round (the jobs' turnaround), over and over; every fifth probe step spent 5 ms in the collector."""
    steps, t = [], 10.0
    for i in range(20):
        steps.append(_step(t, 19.0, probe_tokens=900))
        if i % 5 == 0:
            steps[-1] = dataclasses.replace(steps[-1], gc_s=0.005)
        steps.append(_step(t + 0.020, 0.3))
        t += 0.030
    steps.append(_step(t, 19.0, probe_tokens=900))
    summary = summarise_steps(steps, Windows.of(10.0, t))
    assert summary["empty"]["share_of_time"] == pytest.approx(1 / 3)
    assert summary["probes_only"]["share_of_time"] == pytest.approx(2 / 3)
    assert summary["gc_stalls"] == pytest.approx({"num_steps": 4, "gc_s": 0.020})
    assert summarise_steps([_step(10.0 + i, 1.0, user_tokens=1) for i in range(3)], Windows.of(10.0, 13.0))["gc_stalls"] is None


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


def test_a_step_records_its_threads_cpu_and_the_collectors_time(monkeypatch, tmp_path):
    """A step that burns CPU on the scheduling thread and runs a full collection shows both; a step that only
    waits shows next to no CPU."""
    import gc
    import time

    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "core"))
    tracer = StepTracer.from_env(PROBE)
    requests = {"u1": _request(0)}
    start = tracer.begin()
    tracer.scheduled(start, _output({"u1": 1}, []), requests, [])
    garbage = [[i] for i in range(200_000)]  # something for the collector to walk
    gc.collect()
    deadline = time.thread_time() + 0.03
    while time.thread_time() < deadline:  # 30 ms of this thread's CPU
        pass
    tracer.updated(time.time())
    start = tracer.begin()
    tracer.scheduled(start, _output({"u1": 1}, []), requests, [])
    time.sleep(0.03)  # 30 ms of waiting
    tracer.updated(time.time())
    tracer.close()
    del garbage
    assert not any(getattr(cb, "__self__", None) is tracer._gc for cb in gc.callbacks)  # closed: no longer timing
    busy, idle = read_step_trace(next(tmp_path.glob("core.*.tsv")))
    assert busy.thread_cpu_s >= 0.03 and busy.gc_s > 0
    assert idle.thread_cpu_s < 0.01 and idle.gc_s == 0
    assert idle.update_end_s - idle.schedule_start_s >= 0.03
    assert 0 <= idle.runqueue_wait_s < 0.03  # it slept: blocked, not waiting for a core


def test_a_trace_without_the_cpu_columns_still_reads(tmp_path):
    path = tmp_path / "old.tsv"
    path.write_text("\t".join(COLUMNS[:-3]) + "\n" + "1.0\t1.1\t1.2\t1.3\t20\t1\t2\t0\t0\t0\n")
    (step,) = read_step_trace(path)
    assert (step.probe_tokens, step.thread_cpu_s, step.gc_s, step.runqueue_wait_s) == (20, None, None, None)


@pytest.mark.skipif(not Path("/proc/thread-self/schedstat").exists(), reason="needs Linux schedstat")
def test_a_step_that_shares_its_core_records_the_wait_for_it(monkeypatch, tmp_path):
    """The scheduling thread and a busy process pinned to one core: about half of the step's span is spent
    waiting for that core, and the trace says so."""
    import os
    import subprocess
    import time

    monkeypatch.setenv(TRACE_ENV, str(tmp_path / "core"))
    tracer = StepTracer.from_env(PROBE)
    cpu = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    hog = subprocess.Popen([sys.executable, "-c", f"import os; os.sched_setaffinity(0, {{{cpu}}})\nwhile True: pass"])
    try:
        os.sched_setaffinity(0, {cpu})  # this thread only (Linux affinity is per thread)
        time.sleep(0.3)  # the hog is running
        start = tracer.begin()
        tracer.scheduled(start, _output({"u1": 1}, []), {"u1": _request(0)}, [])
        deadline = time.time() + 0.2
        while time.time() < deadline:
            pass
        tracer.updated(time.time())
    finally:
        os.sched_setaffinity(0, before)
        hog.kill()
        hog.wait()
    (step,) = read_step_trace(next(tmp_path.glob("core.*.tsv")))
    assert step.runqueue_wait_s > 0.04
    assert step.thread_cpu_s + step.runqueue_wait_s == pytest.approx(step.update_end_s - step.schedule_start_s, abs=0.03)


def test_phase_summary_says_where_the_main_thread_spent_its_steps():
    """99 steps of 10 ms computing all the time, one of 40 ms that computed 10 ms, waited 20 ms for a core and
    was blocked 10 ms: the slowest 1 % is that step alone."""
    steps = []
    for i in range(100):
        start = 10.0 + 0.05 * i
        slow = i == 50
        span = 0.040 if slow else 0.010
        steps.append(StepRecord(start, start + 0.001, start + span - 0.001, start + span, 100, 5, 2, 0, 0, 0,
                                thread_cpu_s=0.010, gc_s=0.002 if slow else 0.0, runqueue_wait_s=0.020 if slow else 0.0))
    steps.append(_step(15.0, 1.0))
    threads = summarise_steps(steps, Windows.of(10.0, 15.0))["main_thread"]
    assert threads["slowest_1pct"] == pytest.approx(
        {"span_mean_ms": 40.0, "cpu": 0.25, "runqueue_wait": 0.5, "blocked": 0.25, "gc": 0.05}
    )
    assert threads["all_steps"]["cpu"] == pytest.approx(1.0 / 1.03)
    assert threads["all_steps"]["runqueue_wait"] == pytest.approx(0.02 / 1.03)


def test_engine_time_without_probe_work_is_split_by_where_the_jobs_were():
    """ZO alone, 10 ms steps: 0.00-0.40 s probe steps; 0.40-0.46 s nothing to run while job b is between two
    steps (its grant held back); 0.46-0.60 s probe steps; 0.60-0.64 s nothing while both jobs are inside a step
    (their next probes not in the engine yet); then a step with probes only waiting (not idle)."""
    steps = []
    for i in range(70):
        t = 0.01 * i
        idle = 40 <= i < 46 or 60 <= i < 64
        waiting_only = i == 64
        steps.append(
            StepRecord(t, t + 0.0001, t + 0.009, t + 0.0095, 0 if idle or waiting_only else 400, 0 if idle else 10,
                       0, 0, 0, 0 if idle else 5)
        )
    jobs = {"a": [(0.0, 0.70)], "b": [(0.0, 0.40), (0.46, 0.70)]}
    idle = probe_idle(steps, Windows.of(0.0, 0.69), jobs)
    assert idle["share_of_time"] == pytest.approx(0.10 / 0.69)
    assert idle["a_job_between_steps"] == pytest.approx(0.06 / 0.69)
    assert idle["every_job_mid_step"] == pytest.approx(0.04 / 0.69)
    assert idle["spells"]["num"] == 2
    assert idle["spells"]["p90_ms"] == pytest.approx(60.0, abs=0.1)
    # No job records (the trace alone): every idle step counts as a job between steps.
    assert probe_idle(steps, Windows.of(0.0, 0.69), {})["a_job_between_steps"] == pytest.approx(0.10 / 0.69)
