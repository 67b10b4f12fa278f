"""What a run watches besides the requests: event-loop stalls and GC pauses, CPU per process, the
co-scheduler's state over time, and log records of a dead engine."""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import time
from dataclasses import dataclass

import numpy as np
import psutil

from coserve_parts.windows import Windows


def _run_processes() -> list[psutil.Process]:
    """This process (the service) and every process it started: engine core, worker, load generator."""
    me = psutil.Process()
    return [me, *me.children(recursive=True)]


class EngineDeathCounter(logging.Handler):
    """Counts log records that report a dead engine (vLLM's EngineDeadError), whoever logs them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        exc_type = record.exc_info[0] if record.exc_info else None
        if (exc_type is not None and exc_type.__name__ == "EngineDeadError") or "EngineDead" in record.getMessage():
            self.count += 1


class StallMonitor:
    """Where the service process stalls: event-loop lag (a 5 ms sleep that wakes late) and GC pauses.

    Everything on the server side (HTTP, vLLM output processing, step loops, commits) shares one event loop,
    so a stall of that loop delays every user's first token by its length."""

    def __init__(self) -> None:
        self.loop_lags: list[tuple[float, float]] = []  # (wall time, lag ms) for lags above 5 ms
        self.gc_pauses: list[tuple[float, int, float]] = []  # (wall time, generation, ms)
        self._gc_started: float | None = None

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self._gc_started is not None:
            self.gc_pauses.append((time.time(), info["generation"], (time.perf_counter() - self._gc_started) * 1e3))
            self._gc_started = None

    async def run(self, stop: asyncio.Event) -> None:
        gc.callbacks.append(self._on_gc)
        try:
            while not stop.is_set():
                before = time.perf_counter()
                await asyncio.sleep(0.005)
                lag_ms = (time.perf_counter() - before) * 1e3 - 5.0
                if lag_ms > 5.0:
                    self.loop_lags.append((time.time(), lag_ms))
        finally:
            gc.callbacks.remove(self._on_gc)

    def view(self, windows: Windows | None = None) -> dict:
        """Lags and GC pauses inside the windows (None: all of them)."""
        lags = sorted(ms for t, ms in self.loop_lags if windows is None or t in windows)
        pauses = [(g, ms) for t, g, ms in self.gc_pauses if windows is None or t in windows]
        gen2 = [ms for g, ms in pauses if g == 2]
        return {
            "loop_lags_over_5ms": len(lags),
            "loop_lag_max_ms": lags[-1] if lags else 0.0,
            "loop_lags_over_50ms": sum(1 for ms in lags if ms > 50),
            "loop_lag_over_5ms_total_s": sum(lags) / 1000.0,
            "gc_pauses": len(pauses),
            "gc_pause_max_ms": max((ms for _, ms in pauses), default=0.0),
            "gc_gen2_pauses": len(gen2),
            "gc_gen2_pause_total_ms": sum(gen2),
        }


def host_cpu() -> dict[str, float]:
    """The whole machine's idle CPU seconds so far and those its hypervisor took (steal; 0 where the platform
    has no such counter)."""
    host = psutil.cpu_times()
    return {"host_idle": host.idle, "host_steal": getattr(host, "steal", 0.0)}


class ProcessCpu:
    """CPU seconds per process of this run (the service with its AsyncLLM front end here, vLLM's engine-core and
    worker processes, the load generator) at the start and end of each of a phase's windows: which process takes
    the cores in which phase. Each reading also holds the whole machine's idle time and the time its hypervisor
    took from it (`host_idle`, `host_steal`; /proc/stat through psutil, 0 where the platform has no such
    counter): a window that ran slow because the host took the cores shows it as steal."""

    def __init__(self) -> None:
        self.spans: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {}  # phase -> (start, end) readings
        self._open: dict[str, dict[str, float]] = {}

    def _names(self) -> dict[str, float]:
        totals: dict[str, float] = {}
        for proc in _run_processes():
            try:
                name = "service" if proc.pid == os.getpid() else proc.name()
                if "python" in name:
                    name = "load_generator"
                times = proc.cpu_times()
                totals[name] = totals.get(name, 0.0) + times.user + times.system
            except psutil.Error:
                continue
        return {**totals, **host_cpu()}

    def _reading(self) -> dict[str, float]:
        return {"t": time.time(), **self._names()}

    def begin(self, phase: str) -> None:
        self._open[phase] = self._reading()

    def end(self, phase: str) -> None:
        self.spans.setdefault(phase, []).append((self._open.pop(phase), self._reading()))

    def view(self, phase: str) -> dict[str, float]:
        """CPU seconds per second of each process (and the host's idle and stolen cores) over the phase's
        windows together."""
        return _per_second(self.spans.get(phase, ()))

    def view_by_window(self, phase: str) -> list[dict[str, float]]:
        """`view` of each of the phase's windows on its own, in order (one per round)."""
        return [_per_second([span]) for span in self.spans.get(phase, ())]


def _per_second(spans) -> dict[str, float]:
    elapsed, used = 0.0, {}
    for a, b in spans:
        elapsed += b["t"] - a["t"]
        for k in b:
            if k != "t":
                used[k] = used.get(k, 0.0) + b[k] - a.get(k, 0.0)
    return {k: round(v / elapsed, 3) for k, v in used.items()} if elapsed > 0 else {}


def pin_worker(worker_cpus: set[int], in_engine_core: bool) -> dict[str, list[int]]:
    """Give the process the model runs in (vLLM's worker, or the engine core with `in_engine_core`; every
    thread) `worker_cpus`, and this process, its threads and its other children (the load generator inherits
    it when spawned later) the remaining cores: nothing else runs on the model's cores. Returns each process's
    new CPU set."""
    everything = set(range(os.cpu_count() or 1))
    rest = everything - worker_cpus
    if not worker_cpus or not rest or not worker_cpus <= everything:
        raise ValueError(f"worker cpus {sorted(worker_cpus)} must be a proper subset of {sorted(everything)}")
    placed: dict[str, list[int]] = {}
    for proc in _run_processes():
        # The process the model runs in: vLLM's worker, or the engine core when the model runs there.
        cpus = worker_cpus if "Worker" in proc.name() or (in_engine_core and "EngineCore" in proc.name()) else rest
        for thread in proc.threads():
            os.sched_setaffinity(thread.id, cpus)
        placed[f"{proc.name()}:{proc.pid}"] = sorted(cpus)
    return placed


@dataclass(frozen=True)
class StageRecord:
    wall_s: float  # when the service saw the request's first token (time.time())
    stages_s: dict[str, float]  # TTFT stage -> seconds (service/metrics.py TTFT_STAGES), in order
    request_id: str | None


class StageRecorder:
    """Every user request's TTFT stages as the service records them (it wraps the service's
    `ZoMetrics.observe_ttft_stages`), so a phase gives per-stage tails and the make-up of its slowest
    requests, not just the means a histogram keeps."""

    def __init__(self, metrics) -> None:
        self.records: list[StageRecord] = []
        observe = metrics.observe_ttft_stages

        def recording(stages_s, request_id: str | None = None) -> None:
            self.records.append(StageRecord(time.time(), dict(stages_s), request_id))
            observe(stages_s, request_id=request_id)

        metrics.observe_ttft_stages = recording

    def view(self, windows: Windows) -> dict:
        rows = [record.stages_s for record in self.records if record.wall_s in windows]
        if not rows:
            return {}
        names = list(rows[0])
        table = np.array([[r.get(k, 0.0) for k in names] for r in rows]) * 1000.0  # [requests, stages] ms
        totals = table.sum(axis=1)
        slowest = totals >= np.percentile(totals, 99)
        return {
            "num_requests": len(rows),
            "server_total_p50_ms": float(np.percentile(totals, 50)),
            "server_total_p99_ms": float(np.percentile(totals, 99)),
            "mean_ms": dict(zip(names, table.mean(axis=0).tolist())),
            "p99_ms": dict(zip(names, np.percentile(table, 99, axis=0).tolist())),
            "slowest_1pct_mean_ms": dict(zip(names, table[slowest].mean(axis=0).tolist())),
        }


def steal_peak_cores(rows: list[dict], windows: Windows) -> float | None:
    """The most cores the hypervisor took between two consecutive runtime samples (~0.25 s apart) inside the
    windows: a burst that a window's average steal hides."""
    peak = None
    for a, b in zip(rows, rows[1:]):
        if a["t"] in windows and b["t"] in windows and b["t"] > a["t"] and a.get("host_steal_s") is not None:
            rate = (b["host_steal_s"] - a["host_steal_s"]) / (b["t"] - a["t"])
            peak = rate if peak is None else max(peak, rate)
    return None if peak is None else round(peak, 3)


async def sample_runtime(runtime, rows: list[dict], stop: asyncio.Event, interval_s: float) -> None:
    """The co-scheduler's view over time (budget, its own p95 TTFT, queues), for the plot and the reading."""
    while not stop.is_set():
        stats = runtime.stats()
        record = runtime.coscheduler.latest_record
        rows.append({
            "t": time.time(),
            "budget_tokens": stats.train_budget_tokens,
            "server_ttft_p95_ms": None if stats.user_latency_s is None else stats.user_latency_s * 1000.0,
            "zo_inflight": stats.zo_inflight,
            "zo_waiting": stats.zo_waiting,
            "user_waiting": stats.user_waiting,
            "user_running": stats.user_running,
            "probe_tokens_in_flight": runtime.coscheduler.snapshot().num_probe_tokens_in_flight,  # live, not the last round
            "budget_reason": record.budget_reason if record else None,
            "probe_cap_tokens": cap.cap_tokens if (cap := runtime.coscheduler.probe_cap) is not None else None,
            "host_steal_s": host_cpu()["host_steal"],  # the machine's stolen CPU so far
        })
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass
