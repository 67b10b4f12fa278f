"""Run a script under bench/ in a subprocess and return the JSON object its last line prints."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[2] / "bench"


def run_bench(script: str, *args: str, timeout_s: float = 120) -> dict:
    done = subprocess.run(
        [sys.executable, str(BENCH_DIR / script), *args, "--json"], capture_output=True, text=True, timeout=timeout_s, check=True
    )
    return json.loads(done.stdout.strip().splitlines()[-1])
