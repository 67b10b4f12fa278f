"""A vLLM general plugin (loaded by vLLM in the engine-core and worker processes): how their queues wait.

vLLM's multiprocess executor passes each scheduler step to the worker, and the worker's result back, over a
shared-memory ring (`shm_broadcast.MessageQueue`). A reader that read within the last `busy_loop_s` (vLLM: 1 s)
spins on the ring with `sched_yield()` instead of sleeping on the writer's socket notification. On a machine
with a few cores that spin is not free: while the worker runs a forward, the engine-core process spins for the
whole forward (measured: ~60 % of one of two cores, `results/coserve.md`), taking CPU from the API server that
tokenises, detokenises and streams user requests. The writer notifies the socket on every write, so a reader
that never spins still wakes on each message, a socket wake-up later (tens of µs against forwards of ms).

`ZOSERVE_SHM_BUSY_LOOP_S` (set by `EngineConfig.apply_process_env` before the engine spawns its processes)
overrides `busy_loop_s` for every reader created after this plugin runs; unset leaves vLLM's default. The
plugin is registered under the entry-point group `vllm.general_plugins` in `pyproject.toml`; vLLM loads it in
each process before it creates the queues.
"""

from __future__ import annotations

import functools
import os

BUSY_LOOP_ENV = "ZOSERVE_SHM_BUSY_LOOP_S"
_PATCHED_MARK = "_zoserve_busy_loop_patched"


def busy_loop_override() -> float | None:
    """The configured busy-wait in seconds, or None to keep vLLM's own."""
    raw = os.environ.get(BUSY_LOOP_ENV, "").strip()
    if not raw:
        return None
    value = float(raw)
    if value < 0:
        raise ValueError(f"{BUSY_LOOP_ENV} must be >= 0, got {raw!r}")
    return value


def register() -> None:
    """vLLM calls this once per process; it is safe to call again (the patch is applied once)."""
    override = busy_loop_override()
    if override is None:
        return
    from vllm.distributed.device_communicators import shm_broadcast

    condition = shm_broadcast.SpinCondition
    if getattr(condition, _PATCHED_MARK, False):
        return
    original_init = condition.__init__

    @functools.wraps(original_init)
    def init_with_busy_loop(self, is_reader, context, notify_address, busy_loop_s: float = 1):
        original_init(self, is_reader, context, notify_address, busy_loop_s=override if is_reader else busy_loop_s)

    condition.__init__ = init_with_busy_loop
    setattr(condition, _PATCHED_MARK, True)
