"""Session-wide fixtures: one real vLLM engine on a tiny locally built model for the whole test session."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("ZOSERVE_CACHE_DIR", str(ROOT / ".cache" / "zoserve"))
os.environ.setdefault("ZOSERVE_TASK_DATA_DIR", str((ROOT / ".." / "shared" / "data").resolve()))


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The real Redis on 127.0.0.1:6379, started here if it is not running."""
    if subprocess.run(["redis-cli", "-p", "6379", "ping"], capture_output=True).returncode != 0:
        if shutil.which("redis-server") is None:
            pytest.fail("redis-server is not installed; .ci/run installs it")
        subprocess.run(
            ["redis-server", "--daemonize", "yes", "--port", "6379", "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            check=True,
        )
    return "redis://127.0.0.1:6379/0"


@pytest.fixture(scope="session")
def opt_model_dir() -> str:
    from scheduler.models.tiny import ensure_model

    return str(ensure_model("tiny-opt"))


@pytest.fixture(scope="session")
def llama_model_dir() -> str:
    from scheduler.models.tiny import ensure_model

    return str(ensure_model("tiny-llama"))


@pytest.fixture(scope="session")
async def engine(opt_model_dir, tmp_path_factory):
    """The session's engine binding (tiny OPT, fp32, 10 slots: 9 pinned + 1 for PEFT-dir loads). Tests must drop the states they create.

    It runs vLLM's scheduler behind the per-step probe gate, as the service does, so every engine test goes
    through it."""
    from scheduler.engine.binding import EngineBinding
    from scheduler.engine.config import PROBE_PRIORITY, EngineConfig
    from scheduler.planning.step_gate import StepGateConfig

    binding = await EngineBinding.start(
        EngineConfig(model=opt_model_dir, num_slots=10, step_gate=StepGateConfig(probe_priority=PROBE_PRIORITY)),
        tmp_path_factory.mktemp("engine"),
    )
    yield binding
    binding.shutdown()
