"""bench/job_body_loop.py parses the SST-2 rows both ways and reports what it measured."""

from __future__ import annotations

from bench_json import run_bench


def test_the_job_body_benchmark_checks_the_rows_both_ways_and_prints_json():
    report = run_bench("job_body_loop.py", "--rows", "3000", "--repeats", "1")
    assert report["benchmark"] == "job_body_loop" and report["rows"] == 3000 and report["body_mb"] > 0
    for way in ("route_in_slices", "one_pydantic_call"):
        assert report[way]["wall_ms"] > 0 and report[way]["longest_loop_gap_ms"] > 0
