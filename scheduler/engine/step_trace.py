"""One line per engine step, written by vLLM's scheduler in the engine-core process: what each forward carried
and how long it took, for finding where user latency goes next to ZO work.

Turned on by `ZOSERVE_STEP_TRACE=<path prefix>` in the environment the engine starts with (the engine-core
process writes `<prefix>.<pid>.tsv`); off, it costs one attribute check per step. Times are wall-clock seconds
(`time.time()`, comparable across processes and with the benchmark's phase windows). Columns:

  schedule_start_s  schedule_end_s  update_start_s  update_end_s   (update: after the worker's reply)
  probe_tokens  num_probes  user_tokens  num_user_prefills  num_user_waiting  num_waiting
  thread_cpu_s  gc_s  runqueue_wait_s

`probe_*` counts requests at the probe priority or worse; `num_user_prefills` the user requests scheduled
for the first time in the step; `num_*waiting` the waiting queue after scheduling. A step's forward (with its
RPCs) runs from `schedule_end_s` to `update_start_s`; the next step's `schedule_start_s` ends its period.
`thread_cpu_s` is the CPU time the scheduling thread itself used from `schedule_start_s` to `update_end_s`,
`runqueue_wait_s` the time it was ready to run but waited for a core (the kernel's schedstat; 0 where the
kernel does not keep it), and `gc_s` the time the process spent in Python's garbage collector, over the same
span. What the span holds beyond the first two, the thread spent blocked: on the GIL, a lock or I/O.
`read_step_trace` parses a file back into `StepRecord`s (bench/coserve.py summarises them per phase).
"""

from __future__ import annotations

import gc
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from vllm.v1.core.sched.request_queue import PriorityRequestQueue

TRACE_ENV = "ZOSERVE_STEP_TRACE"
COLUMNS = (
    "schedule_start_s", "schedule_end_s", "update_start_s", "update_end_s",
    "probe_tokens", "num_probes", "user_tokens", "num_user_prefills", "num_user_waiting", "num_waiting",
    "thread_cpu_s", "gc_s", "runqueue_wait_s",
)
_COLUMNS_BEFORE_CPU = COLUMNS[:-3]  # traces written before the CPU and GC columns


@dataclass(frozen=True)
class StepRecord:
    schedule_start_s: float
    schedule_end_s: float
    update_start_s: float
    update_end_s: float
    probe_tokens: int
    num_probes: int
    user_tokens: int
    num_user_prefills: int
    num_user_waiting: int
    num_waiting: int
    thread_cpu_s: float | None = None  # None: a trace written without it
    gc_s: float | None = None
    runqueue_wait_s: float | None = None

    @property
    def forward_s(self) -> float:
        return self.update_start_s - self.schedule_end_s


class _GcClock:
    """Total seconds this process has spent in the garbage collector since it was installed."""

    def __init__(self) -> None:
        self.total_s = 0.0
        self._started: float | None = None
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        elif self._started is not None:
            self.total_s += time.perf_counter() - self._started
            self._started = None

    def close(self) -> None:
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)


class _RunqueueClock:
    """Seconds one thread has waited for a core since it started (Linux schedstat; 0.0 elsewhere).

    The file is opened once, by the first thread that reads, and re-read in place: ~1.6 µs a read on this
    machine against ~15 µs to open and read it anew, twice a step on the engine's main thread."""

    def __init__(self) -> None:
        self._fd: int | None = None
        self._thread: int | None = None

    def read(self) -> float:
        if self._thread is None:
            self._thread = threading.get_ident()
            try:
                self._fd = os.open("/proc/thread-self/schedstat", os.O_RDONLY)
            except OSError:
                self._fd = None
        if self._fd is None or threading.get_ident() != self._thread:
            return 0.0
        try:
            return int(os.pread(self._fd, 128, 0).split()[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class StepTracer:
    """Collects one step's schedule figures, then writes the line when its output has been processed."""

    def __init__(self, out: TextIO, probe_priority: int) -> None:
        self._out = out
        self._probe_priority = probe_priority
        self._pending: str | None = None
        self._gc = _GcClock()
        self._start_cpu_s = 0.0
        self._start_gc_s = 0.0
        self._start_wait_s = 0.0
        self._runqueue = _RunqueueClock()
        out.write("\t".join(COLUMNS) + "\n")

    def close(self) -> None:
        """Stop timing the collector and close the files; a step still pending is not written."""
        self._gc.close()
        self._runqueue.close()
        self._out.close()

    def begin(self) -> float:
        """Called as a step's scheduling starts; returns its wall-clock start."""
        self._start_cpu_s = time.thread_time()
        self._start_gc_s = self._gc.total_s
        self._start_wait_s = self._runqueue.read()
        return time.time()

    @classmethod
    def from_env(cls, probe_priority: int) -> StepTracer | None:
        prefix = os.environ.get(TRACE_ENV, "").strip()
        if not prefix:
            return None
        path = Path(f"{prefix}.{os.getpid()}.tsv")
        path.parent.mkdir(parents=True, exist_ok=True)
        return cls(path.open("w", buffering=1), probe_priority)  # line-buffered: the engine core may be killed

    def scheduled(self, start_s: float, output, requests: dict, waiting) -> None:
        probe_tokens = num_probes = user_tokens = 0
        for request_id, num_tokens in output.num_scheduled_tokens.items():
            if requests[request_id].priority >= self._probe_priority:
                probe_tokens += num_tokens
                num_probes += 1
            else:
                user_tokens += num_tokens
        num_user_prefills = sum(
            1 for new in output.scheduled_new_reqs if requests[new.req_id].priority < self._probe_priority
        )
        num_user_waiting = _count_users_waiting(waiting, self._probe_priority)
        self._pending = (
            f"{start_s:.6f}\t{time.time():.6f}\t{{}}\t{{}}\t{probe_tokens}\t{num_probes}\t{user_tokens}\t"
            f"{num_user_prefills}\t{num_user_waiting}\t{len(waiting)}"
        )

    def updated(self, start_s: float) -> None:
        if self._pending is not None:
            cpu_s = time.thread_time() - self._start_cpu_s
            gc_s = self._gc.total_s - self._start_gc_s
            wait_s = self._runqueue.read() - self._start_wait_s
            self._out.write(
                self._pending.format(f"{start_s:.6f}", f"{time.time():.6f}") + f"\t{cpu_s:.6f}\t{gc_s:.6f}\t{wait_s:.6f}\n"
            )
            self._pending = None


def _count_users_waiting(waiting, probe_priority: int) -> int:
    """The waiting requests that rank above the probes.

    vLLM's priority queue iterates in priority order by popping a copy of its heap, each pop comparing
    `Request`s in Python: counting every request costs ~40 µs a step with ~50 probes waiting, ~200 µs with
    ~200. The users come first in that order, so the count stops at the first probe. Any other iterable (the
    FCFS queue, a list) is counted in full."""
    if not isinstance(waiting, PriorityRequestQueue):
        return sum(1 for request in waiting if request.priority < probe_priority)
    count = 0
    for request in waiting:
        if request.priority >= probe_priority:
            break
        count += 1
    return count


def read_step_trace(path: Path) -> list[StepRecord]:
    records = []
    with path.open() as lines:
        header = tuple(next(lines, "").rstrip("\n").split("\t"))
        if header not in (COLUMNS, _COLUMNS_BEFORE_CPU):
            raise ValueError(f"{path} is not a step trace (header {header[:3]}...)")
        for line in lines:
            fields = line.rstrip("\n").split("\t")
            if len(fields) != len(header):
                continue  # a line cut short when the engine stopped
            records.append(
                StepRecord(*(float(f) for f in fields[:4]), *(int(f) for f in fields[4:10]), *(float(f) for f in fields[10:]))
            )
    return records
