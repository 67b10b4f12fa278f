"""bench/planner_round.py still builds the state it claims to time and reports what it measured."""

from __future__ import annotations

from bench_json import run_bench


def test_the_round_benchmark_runs_in_its_shape_and_prints_json():
    # The script asserts its own shape (two jobs each holding two probe slots) before it times anything.
    report = run_bench("planner_round.py", "--rounds", "50", "--repeats", "2")
    assert report["benchmark"] == "planner_round" and report["rounds"] == 50
    assert 0 < report["round_us_min"] <= report["round_us_median"] <= report["round_us_max"]
