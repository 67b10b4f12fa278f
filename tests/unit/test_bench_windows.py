"""bench/coserve.py's phase windows: one per phase, or one per round with --rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from coserve_parts.summary import zo_summary  # noqa: E402
from coserve_parts.windows import Windows, merge_counts  # noqa: E402


def test_windows_hold_their_spans_and_nothing_between_them():
    windows = Windows.of(10.0, 20.0).add(40.0, 50.0)
    assert 10.0 in windows and 19.99 in windows and 45.0 in windows
    assert 20.0 not in windows and 30.0 not in windows and 50.0 not in windows and 9.0 not in windows
    assert windows.duration_s == 20.0
    assert (windows.start, windows.end) == (10.0, 50.0)
    assert windows.window_end(12.0) == 20.0 and windows.window_end(41.0) == 50.0 and windows.window_end(30.0) is None
    assert windows.to_json() == [[10.0, 20.0], [40.0, 50.0]]


@pytest.mark.parametrize("spans", [((10.0, 5.0),), ((10.0, 20.0), (15.0, 30.0)), ((40.0, 50.0), (10.0, 20.0))])
def test_windows_refuse_backwards_overlapping_or_unordered_spans(spans):
    with pytest.raises(ValueError):
        Windows(spans)


def test_zo_rates_are_per_second_of_window_over_every_round():
    """Steps completing between two rounds' windows (users draining, jobs pausing) do not count, and the rate
    divides by the windows' time, not by the span from the first window's start to the last one's end."""
    steps = [{"time": t, "num_tokens": 100, "duration_s": 0.1} for t in (10.5, 11.5, 15.0, 20.5, 21.5)]
    heavy = [{"time": t, "num_tokens": 100, "duration_s": 0.1} for t in (10.2, 10.4, 11.2, 11.4, 20.2, 20.4, 21.2, 21.4)]
    summary = zo_summary({"light": (1.0, steps), "heavy": (2.0, heavy)}, Windows.of(10.0, 12.0).add(20.0, 22.0))
    assert summary["duration_s"] == 4.0
    assert summary["jobs"]["light"]["num_steps"] == 4  # 15.0 lies between the windows
    assert summary["steps_per_s"] == pytest.approx((4 + 8) / 4.0)
    assert summary["fair_share_error"] == pytest.approx(0.0)


def test_merged_counters_add_up_and_keep_the_largest_maximum():
    merged = merge_counts([
        {"loop_lags_over_5ms": 3, "loop_lag_max_ms": 12.0, "loop_lag_over_5ms_total_s": 0.1},
        {"loop_lags_over_5ms": 2, "loop_lag_max_ms": 30.0, "loop_lag_over_5ms_total_s": 0.2},
        None,
    ])
    assert merged == {"loop_lags_over_5ms": 5, "loop_lag_max_ms": 30.0, "loop_lag_over_5ms_total_s": pytest.approx(0.3)}


def test_cpu_per_phase_adds_up_its_windows():
    from coserve_parts.monitors import ProcessCpu

    cpu = ProcessCpu()
    cpu.spans = {"zo": [
        ({"t": 0.0, "service": 1.0}, {"t": 10.0, "service": 3.0}),
        ({"t": 30.0, "service": 5.0}, {"t": 40.0, "service": 11.0}),
    ]}
    assert cpu.view("zo") == {"service": 0.4}  # 8 s in 20 s
    assert cpu.view("missing") == {}
    assert cpu.view_by_window("zo") == [{"service": 0.2}, {"service": 0.6}]  # one per round, in order
    assert cpu.view_by_window("missing") == []


def test_cpu_readings_carry_the_hosts_idle_and_stolen_time():
    """A window slowed by the hypervisor taking cores shows as host_steal; both host counters are read with
    the processes' and turn into cores (seconds per second) like theirs."""
    from coserve_parts.monitors import ProcessCpu

    cpu = ProcessCpu()
    cpu.begin("users")
    cpu.end("users")
    (start, end), = cpu.spans["users"]
    for reading in (start, end):
        assert reading["service"] > 0  # this test process has run
        assert reading["host_idle"] >= 0 and reading["host_steal"] >= 0
    assert end["host_idle"] >= start["host_idle"] and end["host_steal"] >= start["host_steal"]
    cpu.spans["together"] = [
        ({"t": 0.0, "host_steal": 100.0, "host_idle": 50.0}, {"t": 10.0, "host_steal": 103.0, "host_idle": 51.0}),
    ]
    assert cpu.view_by_window("together") == [{"host_steal": 0.3, "host_idle": 0.1}]


def test_per_round_ttft_ratios_pair_each_round_with_its_own_users_window():
    from coserve_parts.load import UserSample
    from coserve_parts.summary import ttft_p99_ratio_by_round

    def sample(phase: str, at: float, ttft: float) -> UserSample:
        return UserSample(phase, at, at, at + ttft, at + ttft + 0.1, 20, 16, None, None)

    users = Windows.of(0.0, 10.0).add(30.0, 40.0)
    together = Windows.of(20.0, 30.0).add(50.0, 60.0)
    samples = [sample("users", 1.0 + i * 0.05, 0.010) for i in range(100)]  # round 1 alone: 10 ms
    samples += [sample("users", 31.0 + i * 0.05, 0.040) for i in range(100)]  # round 2 alone: a slow stretch, 40 ms
    samples += [sample("together", 21.0 + i * 0.05, 0.020) for i in range(100)]
    samples += [sample("together", 51.0 + i * 0.05, 0.020) for i in range(100)]
    assert ttft_p99_ratio_by_round(samples, users, together) == pytest.approx([2.0, 0.5])


def test_per_round_zo_ratios_pair_each_together_window_with_its_own_zo_window():
    from coserve_parts.summary import zo_steps_ratio_by_round

    zo = Windows.of(10.0, 20.0).add(40.0, 50.0)
    together = Windows.of(20.0, 30.0).add(50.0, 60.0)

    def steps(start: float, count: int) -> list[dict]:
        return [{"time": start + i * 10.0 / count, "num_tokens": 10, "duration_s": 0.1} for i in range(count)]

    light = steps(10.0, 20) + steps(20.0, 10) + steps(40.0, 10) + steps(50.0, 10)  # round 2 alone ran slow
    heavy = steps(10.0, 40) + steps(20.0, 20) + steps(40.0, 20) + steps(50.0, 20) + steps(31.0, 8)  # 31-39: between rounds
    by_round = zo_steps_ratio_by_round({"light": (1.0, light), "heavy": (2.0, heavy)}, zo, together)
    assert by_round == pytest.approx([0.5, 1.0])


def test_quiet_rounds_are_those_no_window_of_which_lost_cores_to_the_hypervisor():
    from coserve_parts.summary import quiet_rounds

    cpu = {
        "users": [{"host_steal": 0.0}, {"host_steal": 0.01}, {"host_steal": 0.0}, {"host_steal": 0.0}],
        "zo": [{"host_steal": 0.02}, {"host_steal": 0.0}, {"host_steal": 0.0}, {}],  # round 4: no reading
        "together": [{"host_steal": 0.05}, {"host_steal": 0.35}, {"host_steal": 0.0}, {"host_steal": 0.0}],
    }
    assert quiet_rounds(cpu) == [0, 2]
    assert quiet_rounds(cpu, limit=0.0) == [2]
    assert quiet_rounds({}) == []


def test_quiet_round_figures_leave_out_the_rounds_a_stolen_core_slowed():
    from types import SimpleNamespace

    from coserve_parts.load import UserSample
    from coserve_parts.summary import quiet_round_figures

    def sample(phase: str, at: float, ttft: float) -> UserSample:
        return UserSample(phase, at, at, at + ttft, at + ttft + 0.1, 20, 16, None, None)

    def steps(start: float, count: int) -> list[dict]:
        return [{"time": start + i * 10.0 / count, "num_tokens": 10, "duration_s": 0.1} for i in range(count)]

    phases = {
        "users": Windows.of(0.0, 10.0).add(30.0, 40.0),
        "zo": Windows.of(10.0, 20.0).add(40.0, 50.0),
        "together": Windows.of(20.0, 30.0).add(50.0, 60.0),
    }
    samples = [sample("users", 1.0 + i * 0.05, 0.010) for i in range(100)]
    samples += [sample("together", 21.0 + i * 0.05, 0.012) for i in range(100)]
    samples += [sample("users", 31.0 + i * 0.05, 0.010) for i in range(100)]
    samples += [sample("together", 51.0 + i * 0.05, 0.080) for i in range(100)]  # round 2: cores stolen
    job = steps(10.0, 40) + steps(20.0, 20) + steps(40.0, 40) + steps(50.0, 4)
    cpu = {phase: [{"host_steal": 0.0}, {"host_steal": 0.3 if phase == "together" else 0.0}] for phase in phases}
    raw = SimpleNamespace(phases=phases, samples=samples, steps_by_job={"job": (1.0, job)}, cpu_by_window=cpu)
    figures = quiet_round_figures(raw)
    assert figures["quiet_rounds"] == [0]
    assert figures["user_ttft_p99_ratio_quiet_rounds"] == pytest.approx(1.2)
    assert figures["zo_steps_ratio_quiet_rounds"] == pytest.approx(0.5)
    raw.cpu_by_window = {}
    assert quiet_round_figures(raw)["user_ttft_p99_ratio_quiet_rounds"] is None


def test_the_steal_peak_finds_a_burst_that_the_windows_average_hides():
    from coserve_parts.monitors import steal_peak_cores

    rows = [{"t": 10.0 + 0.25 * i, "host_steal_s": 0.0} for i in range(40)]  # 10-20 s, nothing stolen ...
    for row in rows[21:]:
        row["host_steal_s"] = 0.2  # ... but for 0.2 s of one core between 15.0 and 15.25 s
    assert steal_peak_cores(rows, Windows.of(10.0, 20.0)) == pytest.approx(0.8)
    assert steal_peak_cores(rows, Windows.of(10.0, 15.0)) == 0.0  # the burst falls after this window
    assert steal_peak_cores(rows, Windows.of(30.0, 40.0)) is None
    assert steal_peak_cores([{"t": 11.0}, {"t": 11.25}], Windows.of(10.0, 20.0)) is None  # rows from before the field


def test_an_ab_of_the_gate_runs_both_caps_each_round_in_alternating_order():
    from coserve_parts.windows import together_windows

    assert together_windows(256, None, 0) == [("together", None)]
    assert together_windows(256, 128, 0) == [("together", 256), ("together_b", 128)]
    assert together_windows(256, 128, 1) == [("together_b", 128), ("together", 256)]
    assert together_windows(256, 128, 2) == together_windows(256, 128, 0)
    # --ab-fast-paths: the engine's vectorised per-step paths on in `together`, off (False, not None) in `together_b`
    assert together_windows(True, False, 0) == [("together", True), ("together_b", False)]
    assert together_windows(True, False, 1) == [("together_b", False), ("together", True)]


def test_ab_figures_compare_each_cap_with_the_same_alone_windows():
    from types import SimpleNamespace

    from coserve_parts.load import UserSample
    from coserve_parts.summary import ab_figures, ab_key

    def sample(phase: str, at: float, ttft: float) -> UserSample:
        return UserSample(phase, at, at, at + ttft, at + ttft + 0.1, 20, 16, None, None)

    def steps(start: float, count: int) -> list[dict]:
        return [{"time": start + i * 10.0 / count, "num_tokens": 10, "duration_s": 0.1} for i in range(count)]

    phases = {  # round 2 runs together_b before together
        "users": Windows.of(0.0, 10.0).add(40.0, 50.0),
        "zo": Windows.of(10.0, 20.0).add(50.0, 60.0),
        "together": Windows.of(20.0, 30.0).add(70.0, 80.0),
        "together_b": Windows.of(30.0, 40.0).add(60.0, 70.0),
    }
    samples = [sample("users", t + i * 0.05, 0.010) for t in (1.0, 41.0) for i in range(100)]
    samples += [sample("together", t + i * 0.05, 0.020) for t in (21.0, 71.0) for i in range(100)]
    samples += [sample("together_b", 31.0 + i * 0.05, 0.012) for i in range(100)]
    samples += [sample("together_b", 61.0 + i * 0.05, 0.014) for i in range(100)]
    job = steps(10.0, 40) + steps(50.0, 40) + steps(20.0, 20) + steps(70.0, 20) + steps(30.0, 8) + steps(60.0, 12)
    raw = SimpleNamespace(
        phases=phases, samples=samples, steps_by_job={"job": (1.0, job)}, phase_s=20.0,
        ttft_stages_by_phase={}, ttft_paths_by_phase={}, cpu_by_phase={}, client_stats={},
    )
    args = SimpleNamespace(step_gate_tokens=256, ab_gate_tokens=128)
    figures = {"user_ttft_p99_ratio": 2.0, "user_ttft_p99_ratio_by_round": [2.0, 2.0],
               "zo_steps_ratio": 0.5, "zo_steps_ratio_by_round": [0.5, 0.5]}
    ab, phase_b = ab_figures(args, raw, figures, 10.0, 4.0)  # ZO alone: 80 steps in 20 s
    assert ab["gate_tokens"] == {"together": 256, "together_b": 128}
    assert ab["user_ttft_p99_ratio"]["together"] == 2.0
    assert ab["user_ttft_p99_ratio"]["together_b"] == pytest.approx(1.4, abs=0.01)  # p99 of 12 and 14 ms
    assert ab["user_ttft_p99_ratio_by_round"]["together_b"] == pytest.approx([1.2, 1.4])
    assert ab["zo_steps_ratio"]["together_b"] == pytest.approx(20 / 80)
    assert ab["zo_steps_ratio_by_round"]["together_b"] == pytest.approx([0.2, 0.3])
    assert phase_b["users"]["num_requests"] == 200 and phase_b["zo"]["steps_per_s"] == pytest.approx(1.0)
    # The same windows as an A/B of the engine's per-step paths: the figures are the same, the variant named.
    fast_paths_ab, _ = ab_figures(SimpleNamespace(ab_fast_paths=True), raw, figures, 10.0, 4.0)
    assert fast_paths_ab["fast_paths"] == {"together": True, "together_b": False} and "gate_tokens" not in fast_paths_ab
    assert fast_paths_ab["user_ttft_p99_ratio"] == ab["user_ttft_p99_ratio"]
    # ... and of pipelined commits, under their own key in the JSON.
    commits_args = SimpleNamespace(ab_pipelined_commits=True)
    commits_ab, _ = ab_figures(commits_args, raw, figures, 10.0, 4.0)
    assert commits_ab["pipelined_commits"] == {"together": True, "together_b": False} and "fast_paths" not in commits_ab
    assert commits_ab["zo_steps_ratio"] == ab["zo_steps_ratio"]
    assert ab_key(commits_args) == "ab_pipelined_commits" and ab_key(SimpleNamespace(ab_fast_paths=True)) == "ab_fast_paths"
    assert ab_key(args) == "ab_gate"
