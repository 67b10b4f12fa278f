"""bench/planner_round.py still builds the state it claims to time and reports what it measured."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[2] / "bench" / "planner_round.py"


def test_the_round_benchmark_runs_in_its_shape_and_prints_json():
    # The script asserts its own shape (two jobs each holding two probe slots) before it times anything.
    done = subprocess.run(
        [sys.executable, str(BENCH), "--rounds", "50", "--repeats", "2", "--json"],
        capture_output=True, text=True, timeout=120, check=True,
    )
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["benchmark"] == "planner_round" and report["rounds"] == 50
    assert 0 < report["round_us_min"] <= report["round_us_median"] <= report["round_us_max"]
