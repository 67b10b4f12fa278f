"""A vLLM general plugin (loaded by vLLM in the engine-core and worker processes): how their queues wait.

vLLM's multiprocess executor passes each scheduler step to the worker, and the worker's result back, over a
shared-memory ring (`shm_broadcast.MessageQueue`). A reader that read within the last `busy_loop_s` (vLLM: 1 s)
spins on the ring with `sched_yield()`; after that it sleeps on the writer's socket notification, for up to 5 s
a time. On a machine with a few cores that spin is not free: the worker spins for a second after every step,
and the engine core through every forward, on the core the API server needs to tokenise, detokenise and stream
user requests (measured: ~60 % of one of two cores, `results/coserve.md`).

The notification alone cannot replace the spin: it can be lost (the writer's socket keeps one message and
drops the rest, the reader's keeps only the last), and vLLM then waits out its 5 s re-check. Measured: with
`busy_loop_s` = 0 a ping-pong over two queues stalls for seconds within a few hundred messages. So past the
busy loop this plugin sleeps on the notification for at most `IDLE_POLL_MS` at a time and then looks at the
ring again: a lost notification costs at most that long, and an idle reader wakes ~1,000 times a second
(a few % of a core) instead of spinning.

Notifications must not be lost in the common case either. vLLM's writer publishes them with a send
high-water mark of 1, and a notification sent within about a millisecond of the previous one on the same
socket is dropped (tests/unit/test_vllm_plugin.py shows it on 30 of 30 engine-like steps). Every
engine step is two worker RPCs (`execute_model`, then `sample_tokens` ~0.2 ms later), so the second reply's
notification was dropped on most steps and the engine core woke only at the end of its poll slice: measured
on 2 cores, tiny model, 4 streaming users, the reply reached the engine core 0.95 ms (median) after the worker
sent it, and a decode step took 3.3 ms; with a deeper writer queue (`NOTIFY_HWM`) the step took 2.5 ms, with
probe traffic 7.5 -> 5.6 ms. The readers keep vLLM's conflating socket, so extra notifications never pile up.

`ZOSERVE_SHM_BUSY_LOOP_S` (set by `EngineConfig.apply_process_env` before the engine spawns its processes)
sets `busy_loop_s` for every reader and turns the bounded sleep on; unset leaves vLLM exactly as it is. The
plugin is registered under the entry-point group `vllm.general_plugins` in `pyproject.toml`; vLLM loads it in
each process before it creates the queues.
"""

from __future__ import annotations

import functools
import os
import time

BUSY_LOOP_ENV = "ZOSERVE_SHM_BUSY_LOOP_S"
_PATCHED_MARK = "_zoserve_busy_loop_patched"
IDLE_POLL_MS = 1  # longest sleep on the notification before the reader looks at the ring again
NOTIFY_HWM = 1024  # notifications a writer may have in flight (vLLM: 1); readers conflate them


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
    import zmq
    from vllm.distributed.device_communicators import shm_broadcast
    from vllm.distributed.utils import sched_yield

    condition = shm_broadcast.SpinCondition
    if getattr(condition, _PATCHED_MARK, False):
        return
    original_init = condition.__init__

    @functools.wraps(original_init)
    def init_with_busy_loop(self, is_reader, context, notify_address, busy_loop_s: float = 1):
        original_init(self, is_reader, context, notify_address, busy_loop_s=override if is_reader else busy_loop_s)
        if not is_reader:
            # The high-water mark applies to connections made after bind; no reader has connected yet, so
            # the writer's socket is rebound with a deeper one in place of vLLM's.
            self.local_notify_socket.setsockopt(zmq.LINGER, 0)
            self.local_notify_socket.close()
            self.local_notify_socket = context.socket(zmq.PUB)
            self.local_notify_socket.setsockopt(zmq.SNDHWM, NOTIFY_HWM)
            self.local_notify_socket.bind(notify_address)

    def wait_in_slices(self, timeout_ms: int | None = None) -> None:
        # Same contract as SpinCondition.wait: return when the caller should look at the ring again.
        if time.monotonic() <= self.last_read + self.busy_loop_s:
            sched_yield()
            return
        slice_ms = IDLE_POLL_MS if timeout_ms is None else max(0, min(timeout_ms, IDLE_POLL_MS))
        events = dict(self.poller.poll(timeout=slice_ms))
        if self.local_notify_socket in events:
            self.local_notify_socket.recv(flags=zmq.NOBLOCK, copy=False)

    condition.__init__ = init_with_busy_loop
    condition.wait = wait_in_slices
    setattr(condition, _PATCHED_MARK, True)
