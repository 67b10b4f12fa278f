"""bench/coserve.py's printed summary reads every result the benchmark writes, old and new.

The printer runs after a 7-minute measurement and before the JSON is written: a key it does not expect (as
the step summary's `main_thread` entry once was) loses the run. Real result files serve as the inputs.
"""

from __future__ import annotations

import functools
import importlib.util
import json
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@functools.cache
def _coserve():
    spec = importlib.util.spec_from_file_location("coserve_bench", ROOT / "bench" / "coserve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results():
    yield "coserve.json", json.loads((ROOT / "results" / "coserve.json").read_text())
    for session in (14, 19):  # 19: in-run A/Bs of the per-step paths and of pipelined commits
        for run_id, result in json.loads((ROOT / "results" / f"coserve-session{session}.json").read_text()).items():
            yield f"{session}:{run_id}", result


@pytest.mark.parametrize("name,result", list(_results()), ids=lambda v: v if isinstance(v, str) else "")
def test_the_summary_prints_every_result(name, result, capsys):
    _coserve().print_summary(result)
    out = capsys.readouterr().out
    assert "user_ttft_p99_ratio" in out and "engine steps, together" in out
    has_threads = bool(result["phases"]["together"].get("engine_steps", {}).get("main_thread"))
    assert ("engine main thread, together" in out) == has_threads
    assert ("A/B commits together_b before the next step" in out) == ("ab_pipelined_commits" in result)
    assert ("A/B per-step paths together_b vLLM" in out) == ("ab_fast_paths" in result)
