"""The engine's own processes (vLLM engine core and worker) sleep between requests: our vLLM plugin reached them.

vLLM's shared-memory queue readers spin for 1 s after each read; both processes would then burn most of a
core each for a second after every request, on a machine whose other core serves HTTP.
"""

from __future__ import annotations

import asyncio
import time

import psutil

from scheduler.engine.binding import USER_PRIORITY

IDLE_S = 0.6


def _cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        try:
            times = process.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += times.user + times.system
    return total


async def test_engine_processes_do_not_spin_after_a_request(engine):
    children = psutil.Process().children(recursive=True)
    assert children, "the engine runs in child processes"
    async for _ in engine.generate(
        [2, 100, 200, 300], max_tokens=4, temperature=0.0, top_p=1.0, seed=None, stop=None, slot=None,
        salt="idle-test", priority=USER_PRIORITY,
    ):
        pass
    before, started = _cpu_seconds(children), time.monotonic()
    await asyncio.sleep(IDLE_S)
    used = _cpu_seconds(children) - before
    elapsed = time.monotonic() - started
    # Spinning, the engine core and the worker would take ~2 × elapsed between them (or all the CPU they get).
    assert used < 0.2 * elapsed, f"engine processes used {used:.2f} CPU-s in {elapsed:.2f} s of idle"
