"""The policy package must stay importable without torch or vllm (and without an event loop)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_package_imports_no_torch_vllm_or_asyncio():
    code = (
        "import sys, scheduler.planning, scheduler.planning.simulate\n"
        "heavy = [m for m in ('torch', 'vllm', 'asyncio', 'numpy') if m in sys.modules]\n"
        "print(','.join(heavy))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == ""
