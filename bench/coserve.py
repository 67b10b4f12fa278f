"""Co-serving: user latency and ZO progress when two training jobs share the engine with live traffic.

One run drives the real service in-process (uvicorn on 127.0.0.1, requests over real HTTP): three served
adapters for users, two training jobs (weights 1 and 2) on two more adapters. In order:
  calibrate — closed-loop saturation with streaming completions alone: the service's completion capacity;
  users     — open-loop Poisson arrivals (fixed seed) at `--load-fraction` x capacity, streaming completions
              of `--output-tokens` tokens, adapters round-robin; nothing else runs;
  zo        — the two jobs alone, for as long as the users phase;
  together  — the same arrival sequence again, with both jobs running.
User load comes from a separate client process (its own event loop). Time to first token (TTFT) is taken at
the client, from the scheduled arrival time to the first SSE chunk that
carries text; end-to-end (e2e) to `[DONE]`. ZO step rates and scoring tokens come from the jobs' step metrics
(`GET /v1/jobs/{id}/metrics`), counted by step completion time inside each phase's window.

Figures (the JSON's last line with --json):
  user_ttft_p99_ratio  p99 TTFT together / p99 TTFT users alone     (target <= 1.25)
  user_e2e_p99_ratio   p99 e2e together / p99 e2e users alone
  zo_steps_ratio       steps/s of both jobs together / steps/s of both jobs alone (target >= 0.5)
  zo_token_share       ZO scoring tokens / (ZO scoring tokens + user prompt and output tokens), together phase
  fair_share_error     |tokens of the weight-2 job / tokens of both jobs - 2/3|, worst of the zo and together
                       phases (target <= 0.10)

    .venv/bin/python bench/coserve.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import json
import logging
import random
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import httpx  # noqa: E402
import numpy as np  # noqa: E402
import uvicorn  # noqa: E402

from scheduler.datasets import load_sst2  # noqa: E402
from scheduler.engine.binding import EngineBinding  # noqa: E402
from service.app import create_app, engine_config  # noqa: E402
from service.settings import Settings  # noqa: E402

USER_ADAPTERS = ("users-a", "users-b", "users-c")
JOBS = (("zo-w1", 1.0), ("zo-w2", 2.0))  # (adapter, fair-share weight)
TARGETS = {"user_ttft_p99_ratio": ("<=", 1.25), "zo_steps_ratio": (">=", 0.5), "fair_share_error": ("<=", 0.10)}
PAPER_TTFT_P99_INCREASE = "+215% to +695%"  # the seed paper's serving variant, throughput kept


@dataclass(frozen=True)
class UserSample:
    phase: str
    scheduled_s: float  # wall time the request was due (open loop) or sent (closed loop)
    sent_s: float
    first_text_s: float | None
    done_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None

    @property
    def send_lag_s(self) -> float:
        return self.sent_s - self.scheduled_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_text_s is None else self.first_text_s - self.scheduled_s

    @property
    def e2e_s(self) -> float:
        return self.done_s - self.scheduled_s


class EngineDeathCounter(logging.Handler):
    """Counts log records that report a dead engine (vLLM's EngineDeadError), whoever logs them."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        exc_type = record.exc_info[0] if record.exc_info else None
        if (exc_type is not None and exc_type.__name__ == "EngineDeadError") or "EngineDead" in record.getMessage():
            self.count += 1


# ----------------------------------------------------------------- the service, in-process over HTTP
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Service:
    def __init__(self, settings: Settings, binding: EngineBinding):
        self.app = create_app(settings, binding=binding)
        self.port = _free_port()
        self.server = uvicorn.Server(
            uvicorn.Config(self.app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        )
        self.task: asyncio.Task | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def runtime(self):
        return self.app.state.runtime

    async def __aenter__(self) -> Service:
        self.task = asyncio.create_task(self.server.serve())
        deadline = time.monotonic() + 600
        while not self.server.started:
            if self.task.done():
                self.task.result()
                raise RuntimeError("uvicorn exited before it started")
            if time.monotonic() > deadline:
                raise TimeoutError("the service did not start within 600 s")
            await asyncio.sleep(0.1)
        return self

    async def __aexit__(self, *exc) -> None:
        self.server.should_exit = True
        await asyncio.wait_for(self.task, 300)


# ----------------------------------------------------------------- user load
async def one_request(client: httpx.AsyncClient, phase: str, model: str, prompt: str, max_tokens: int, scheduled_s: float) -> UserSample:
    body = {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
        "stream_options": {"include_usage": True},
    }
    sent = time.time()
    first, usage, error = None, None, None
    try:
        async with client.stream("POST", "/v1/completions", json=body) as reply:
            if reply.status_code != 200:
                error = f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}"
            else:
                async for line in reply.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        break
                    event = json.loads(line[len("data: "):])
                    if event.get("usage"):
                        usage = event["usage"]
                    if first is None and any(choice.get("text") for choice in event.get("choices", ())):
                        first = time.time()
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    if error is None and usage is None:
        error = "no usage chunk"
    return UserSample(
        phase, scheduled_s, sent, first, time.time(),
        usage["prompt_tokens"] if usage else 0, usage["completion_tokens"] if usage else 0, error,
    )


def poisson_offsets(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    offsets, t = [], 0.0
    while (t := t + rng.expovariate(rate_per_s)) < duration_s:
        offsets.append(t)
    return offsets


async def open_loop(client, phase: str, prompts: list[str], offsets: list[float], args) -> tuple[float, list[UserSample], dict]:
    """Send a request at each offset from now, whatever is still in flight; all samples once every one ends.

    The load generator's own garbage collector is off during the phase (a full collection of its heap stalled
    sends and reads for hundreds of ms, which the measurement charged to the server), and its event-loop lags
    are returned with the samples (the same monitor as the service's)."""
    gc.collect()
    gc.disable()
    monitor = StallMonitor()
    stop = asyncio.Event()
    watching = asyncio.create_task(monitor.run(stop))
    try:
        start, samples = await _send_open_loop(client, phase, prompts, offsets, args)
    finally:
        stop.set()
        await watching
        gc.enable()
    return start, samples, monitor.view(float("-inf"), float("inf"))


async def _send_open_loop(client, phase: str, prompts: list[str], offsets: list[float], args) -> tuple[float, list[UserSample]]:
    start = time.time()
    tasks = []
    for i, offset in enumerate(offsets):
        delay = start + offset - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        model = USER_ADAPTERS[i % len(USER_ADAPTERS)]
        tasks.append(asyncio.create_task(
            one_request(client, phase, model, prompts[i % len(prompts)], args.output_tokens, start + offset)
        ))
    return start, list(await asyncio.gather(*tasks))


def _client_main(url: str, kind: str, payload: dict):
    """Entry point of the load-generator process: its own interpreter and event loop, like a real client."""

    async def go():
        limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            ns = argparse.Namespace(**payload["args"])
            if kind == "open":
                return await open_loop(client, payload["phase"], payload["prompts"], payload["offsets"], ns)
            return await closed_loop(
                client, payload["prompts"], payload["concurrency"], payload["warmup_s"], payload["measure_s"], ns
            )

    return asyncio.run(go())


class LoadClient:
    """User load from a separate process. In-process, every stall of the service's event loop (engine output
    processing, step loops, commits) also stalled the load generator's clock and sends (send lag p99 120 ms),
    so the measurement mixed the two; real users are not inside the server."""

    def __init__(self, url: str, args) -> None:
        import concurrent.futures
        import multiprocessing

        self._url = url
        self._args = {"output_tokens": args.output_tokens}
        self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    async def _call(self, kind: str, payload: dict):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _client_main, self._url, kind, {**payload, "args": self._args})

    async def open_loop(self, phase: str, prompts: list[str], offsets: list[float]) -> tuple[float, list[UserSample], dict]:
        return await self._call("open", {"phase": phase, "prompts": prompts, "offsets": offsets})

    async def closed_loop(self, prompts: list[str], concurrency: int, warmup_s: float, measure_s: float) -> dict:
        payload = {"prompts": prompts, "concurrency": concurrency, "warmup_s": warmup_s, "measure_s": measure_s}
        return await self._call("closed", payload)

    def close(self) -> None:
        self._pool.shutdown()


async def closed_loop(client, prompts: list[str], concurrency: int, warmup_s: float, measure_s: float, args) -> dict:
    start = time.time()
    stop_at = start + warmup_s + measure_s
    samples: list[UserSample] = []

    async def worker(index: int) -> None:
        i = index
        while time.time() < stop_at:
            model = USER_ADAPTERS[i % len(USER_ADAPTERS)]
            samples.append(await one_request(client, "calibrate", model, prompts[i % len(prompts)], args.output_tokens, time.time()))
            i += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    window = [s for s in samples if start + warmup_s <= s.done_s <= stop_at and s.error is None]
    return {
        "concurrency": concurrency,
        "measure_s": measure_s,
        "num_completed": len(window),
        "num_errors": sum(1 for s in samples if s.error is not None),
        "completions_per_s": len(window) / measure_s,
        "output_tokens_per_s": sum(s.num_output_tokens for s in window) / measure_s,
        "ttft_p50_ms": _pct([s.ttft_s for s in window], 50),
        "e2e_p50_ms": _pct([s.e2e_s for s in window], 50),
    }


# ----------------------------------------------------------------- jobs
def _rows(split: str, limit: int) -> list[dict]:
    return [{"text": ex.text, "label": ex.label} for ex in load_sst2(split, limit=limit)]


def job_body(adapter: str, weight: float, max_steps: int, batch_size: int, q: int, rows: list[dict]) -> dict:
    return {
        "adapter": adapter,
        "hyperparameters": {"learning_rate": 1e-3, "eps": 1e-2, "num_directions": q, "batch_size": batch_size, "max_steps": max_steps},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training_data": rows,
        "seed": 3,
        "weight": weight,
    }


async def create_job(client, body: dict) -> str:
    reply = await client.post("/v1/jobs", json=body)
    if reply.status_code != 201:
        raise RuntimeError(f"job for {body['adapter']} not created: {reply.status_code} {reply.text}")
    return reply.json()["id"]


async def wait_job(client, job_id: str, predicate, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic() + 30
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if predicate(job):
            return job
        if time.monotonic() > next_report:
            print(f"  waiting for {job['adapter']}: {job['status']}, step {job['step']}", flush=True)
            next_report = time.monotonic() + 30
        if job["status"] in ("failed", "cancelled", "succeeded"):
            raise RuntimeError(f"job {job_id} ended before the benchmark expected: {job}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not ready within {timeout_s} s: {job}")
        await asyncio.sleep(0.2)


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

    def view(self, a: float, b: float) -> dict:
        lags = sorted(ms for t, ms in self.loop_lags if a <= t < b)
        pauses = [(g, ms) for t, g, ms in self.gc_pauses if a <= t < b]
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


class ProcessCpu:
    """CPU seconds per process of this run (the service with its AsyncLLM front end here, vLLM's engine-core and
    worker processes, the load generator) at phase boundaries: which process takes the cores in which phase."""

    def __init__(self) -> None:
        import psutil

        self._me = psutil.Process()
        self.marks: dict[str, dict[str, float]] = {}

    def _names(self) -> dict[str, float]:
        import psutil

        totals: dict[str, float] = {}
        for proc in [self._me, *self._me.children(recursive=True)]:
            try:
                name = "service" if proc.pid == self._me.pid else proc.name()
                if "python" in name:
                    name = "load_generator"
                times = proc.cpu_times()
                totals[name] = totals.get(name, 0.0) + times.user + times.system
            except psutil.Error:
                continue
        return totals

    def mark(self, label: str) -> None:
        self.marks[label] = {"t": time.time(), **self._names()}

    def view(self, start: str, end: str) -> dict[str, float]:
        a, b = self.marks.get(start), self.marks.get(end)
        if a is None or b is None:
            return {}
        elapsed = b["t"] - a["t"]
        return {k: round((b[k] - a.get(k, 0.0)) / elapsed, 3) for k in b if k != "t"}


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
        })
        try:
            await asyncio.wait_for(stop.wait(), interval_s)
        except TimeoutError:
            pass


# ----------------------------------------------------------------- summaries
SENT_LATE_S = 0.020  # a request the load generator sent more than this after its scheduled arrival


def _pct(values_s, q: float) -> float | None:
    values = [v for v in values_s if v is not None]
    return float(np.percentile(values, q) * 1000.0) if values else None


def user_summary(samples: list[UserSample], duration_s: float) -> dict:
    ok = [s for s in samples if s.error is None and s.ttft_s is not None]
    return {
        "num_requests": len(samples),
        "num_errors": sum(1 for s in samples if s.error),
        # Sampled end-of-text first (one output token, no text): no TTFT to count, not a service error.
        "num_without_text": sum(1 for s in samples if not s.error and s.ttft_s is None),
        "errors": sorted({s.error for s in samples if s.error})[:5],
        "offered_rate_per_s": len(samples) / duration_s,
        "ttft_p50_ms": _pct([s.ttft_s for s in ok], 50),
        "ttft_p90_ms": _pct([s.ttft_s for s in ok], 90),
        "ttft_p99_ms": _pct([s.ttft_s for s in ok], 99),
        "e2e_p50_ms": _pct([s.e2e_s for s in ok], 50),
        "e2e_p99_ms": _pct([s.e2e_s for s in ok], 99),
        "send_lag_p99_ms": _pct([s.send_lag_s for s in samples], 99),
        # Diagnostic only (the targets use every request): the load generator is a separate process, so a
        # request it sent late was held up by the machine, not (only) by the server.
        "num_sent_late": sum(1 for s in samples if s.send_lag_s > SENT_LATE_S),
        "ttft_p99_ms_sent_on_time": _pct([s.ttft_s for s in ok if s.send_lag_s <= SENT_LATE_S], 99),
        "mean_output_tokens": float(np.mean([s.num_output_tokens for s in ok])) if ok else None,
    }


def zo_summary(steps_by_job: dict[str, tuple[float, list[dict]]], t0: float, t1: float) -> dict:
    duration = t1 - t0
    jobs = {}
    for adapter, (weight, steps) in steps_by_job.items():
        inside = [m for m in steps if t0 <= m["time"] < t1]
        jobs[adapter] = {
            "weight": weight,
            "num_steps": len(inside),
            "steps_per_s": len(inside) / duration,
            "num_tokens": sum(m["num_tokens"] for m in inside),
            "step_s_median": float(np.median([m["duration_s"] for m in inside])) if inside else None,
        }
    total_tokens = sum(j["num_tokens"] for j in jobs.values())
    total_weight = sum(j["weight"] for j in jobs.values())
    for j in jobs.values():
        j["token_share"] = j["num_tokens"] / total_tokens if total_tokens else None
        j["fair_share"] = j["weight"] / total_weight
    heavy = max(jobs.values(), key=lambda j: j["weight"])
    return {
        "duration_s": duration,
        "steps_per_s": sum(j["steps_per_s"] for j in jobs.values()),
        "num_tokens": total_tokens,
        "tokens_per_s": total_tokens / duration,
        "fair_share_error": abs(heavy["token_share"] - heavy["fair_share"]) if total_tokens else None,
        "jobs": jobs,
    }


def _ratio(a, b):
    return a / b if a is not None and b else None


def _meets(key: str, value) -> bool | None:
    if value is None:
        return None
    op, bound = TARGETS[key]
    return value <= bound if op == "<=" else value >= bound


# ----------------------------------------------------------------- plot
def plot(path: Path, origin: float, phases: dict, samples: list[UserSample], steps_by_job, runtime_rows, window_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_user, ax_zo, ax_budget) = plt.subplots(3, 1, figsize=(11, 9), sharex=True)
    colors = {"users": "#dbe9f6", "zo": "#fde8d0", "together": "#e3f1dc"}
    for name, (t0, t1) in phases.items():
        for ax in (ax_user, ax_zo, ax_budget):
            ax.axvspan(t0 - origin, t1 - origin, color=colors[name], zorder=0)
        ax_user.text((t0 + t1) / 2 - origin, 1.0, name, transform=ax_user.get_xaxis_transform(), ha="center", va="bottom")

    ok = [s for s in samples if s.ttft_s is not None and s.phase in ("users", "together")]
    xs = np.array([s.scheduled_s - origin for s in ok])
    ys = np.array([s.ttft_s * 1000.0 for s in ok])
    ax_user.scatter(xs, ys, s=3, color="0.6", alpha=0.5, label="TTFT (each request)")
    grid = np.arange(0.0, max(t1 for _, t1 in phases.values()) - origin, 1.0)
    p50, p99 = [], []
    for t in grid:
        inside = ys[(xs > t - window_s) & (xs <= t)]
        p50.append(np.percentile(inside, 50) if len(inside) >= 10 else np.nan)
        p99.append(np.percentile(inside, 99) if len(inside) >= 10 else np.nan)
    ax_user.plot(grid, p50, color="tab:blue", label=f"rolling p50 ({window_s:.0f} s)")
    ax_user.plot(grid, p99, color="tab:red", label=f"rolling p99 ({window_s:.0f} s)")
    ax_user.set_yscale("log")
    ax_user.set_ylabel("user TTFT (ms)")
    ax_user.legend(loc="upper left", fontsize=8)

    bin_s = 2.0
    edges = np.arange(0.0, grid[-1] + bin_s if len(grid) else bin_s, bin_s)
    total = np.zeros(max(0, len(edges) - 1))
    for (adapter, (weight, steps)), style in zip(steps_by_job.items(), ("--", ":")):
        counts, _ = np.histogram([m["time"] - origin for m in steps], bins=edges)
        total += counts
        ax_zo.step(edges[:-1], counts / bin_s, where="post", ls=style, label=f"{adapter} (weight {weight:g})")
    ax_zo.step(edges[:-1], total / bin_s, where="post", color="k", label="both jobs")
    ax_zo.set_ylabel(f"ZO steps/s ({bin_s:.0f} s bins)")
    ax_zo.legend(loc="upper left", fontsize=8)

    ts = [r["t"] - origin for r in runtime_rows]
    ax_budget.plot(ts, [r["budget_tokens"] for r in runtime_rows], color="tab:purple", label="ZO token budget")
    ax_budget.plot(ts, [r["probe_tokens_in_flight"] or 0 for r in runtime_rows], color="tab:orange", lw=0.8, label="probe tokens in flight")
    ax_budget.set_ylabel("tokens")
    ax_budget.set_xlabel("seconds since the users phase began")
    ax_budget.legend(loc="upper left", fontsize=8)
    fig.suptitle("zoserve co-serving: user TTFT and ZO step rate across the three phases")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ----------------------------------------------------------------- the run
@dataclass
class Raw:
    """What one run collected, before any summary."""

    calibration: dict
    rate_per_s: float
    phase_s: float
    phases: dict[str, tuple[float, float]]  # name -> (wall start, wall end) of its measurement window
    samples: list[UserSample]
    steps_by_job: dict[str, tuple[float, list[dict]]]  # adapter -> (weight, step metrics from the API)
    runtime_rows: list[dict]
    job_states: dict[str, str]
    engine_healthy: bool
    stalls: StallMonitor
    client_stats: dict[str, dict]  # phase -> the load generator's own event-loop lags
    cpu_by_phase: dict[str, dict[str, float]]  # phase -> process -> CPU seconds per second


async def prepare_user_adapters(client, prompts: list[str], args) -> None:
    """Three served adapters for users: two ZO steps each make them exist with a committed version."""
    rows = _rows("train", 64)
    ids = [await create_job(client, job_body(name, 1.0, 2, 4, 1, rows)) for name in USER_ADAPTERS]
    for job_id in ids:
        await wait_job(client, job_id, lambda j: j["status"] == "succeeded", 600)
    for name in USER_ADAPTERS:  # every adapter answers once before anything is measured
        warm = await one_request(client, "warmup", name, prompts[0], args.output_tokens, time.time())
        if warm.error:
            raise RuntimeError(f"warm-up request to {name} failed: {warm.error}")


async def measure(args, service: Service, prompts: list[str], train_rows: list[dict]) -> Raw:
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    load = LoadClient(service.url, args)
    async with httpx.AsyncClient(base_url=service.url, timeout=120, limits=limits) as client:
        await prepare_user_adapters(client, prompts, args)
        await load.open_loop("warmup", prompts, [0.0])  # start the client process before anything is timed
        print("calibrating: closed loop, streaming completions alone ...", flush=True)
        calibration = await load.closed_loop(prompts, args.calibrate_concurrency, args.calibrate_warmup_s, args.calibrate_s)
        rate = args.load_fraction * calibration["completions_per_s"]
        duration = min(args.max_phase_s, max(args.min_phase_s, args.requests_per_phase / rate))
        offsets = poisson_offsets(rate, duration, args.seed)  # the same arrivals in both user phases
        print(
            f"capacity {calibration['completions_per_s']:.1f} completions/s at concurrency {args.calibrate_concurrency}; "
            f"load {rate:.2f}/s ({args.load_fraction:.0%}): {len(offsets)} requests per user phase over {duration:.0f} s",
            flush=True,
        )
        await asyncio.sleep(args.pause_s)

        runtime_rows: list[dict] = []
        stalls = StallMonitor()
        cpu = ProcessCpu()
        stop_sampling = asyncio.Event()
        sampler = asyncio.create_task(sample_runtime(service.runtime, runtime_rows, stop_sampling, 0.25))
        stall_task = asyncio.create_task(stalls.run(stop_sampling))
        phases: dict[str, tuple[float, float]] = {}
        client_stats: dict[str, dict] = {}
        samples: list[UserSample] = []
        job_ids: dict[str, str] = {}
        try:
            print("phase users: users alone ...", flush=True)
            cpu.mark("users_start")
            t0, got, client_stats["users"] = await load.open_loop("users", prompts, offsets)
            cpu.mark("users_end")
            phases["users"] = (t0, t0 + duration)
            samples += got
            if args.target_ttft_ms is None and args.target_from_users is not None:
                alone = [r["server_ttft_p95_ms"] for r in runtime_rows if t0 <= r["t"] and r["server_ttft_p95_ms"]]
                target_ms = args.target_from_users * float(np.median(alone))
                service.runtime.coscheduler.set_target_ttft_ms(target_ms)
                args.target_ttft_ms = target_ms
                print(f"co-scheduler target: {target_ms:.0f} ms p95 TTFT ({args.target_from_users} x users-alone median p95)")

            for adapter, weight in JOBS:
                body = job_body(adapter, weight, 1_000_000, args.zo_batch_size, args.zo_q, train_rows)
                job_ids[adapter] = await create_job(client, body)
            for job_id in job_ids.values():
                await wait_job(client, job_id, lambda j: j["status"] == "running" and j["step"] >= args.zo_warmup_steps, 600)

            print("phase zo: the two jobs alone ...", flush=True)
            t0 = time.time()
            cpu.mark("zo_start")
            await asyncio.sleep(duration)
            cpu.mark("zo_end")
            phases["zo"] = (t0, t0 + duration)

            print("phase together: users and the two jobs ...", flush=True)
            cpu.mark("together_start")
            t0, got, client_stats["together"] = await load.open_loop("together", prompts, offsets)
            cpu.mark("together_end")
            phases["together"] = (t0, t0 + duration)
            samples += got

            steps_by_job, job_states = {}, {}
            for adapter, weight in JOBS:
                steps_by_job[adapter] = (weight, (await client.get(f"/v1/jobs/{job_ids[adapter]}/metrics")).json()["steps"])
                job_states[adapter] = (await client.get(f"/v1/jobs/{job_ids[adapter]}")).json()["status"]
        finally:
            stop_sampling.set()
            await sampler
            await stall_task
            for job_id in job_ids.values():
                await client.post(f"/v1/jobs/{job_id}/cancel")
        try:
            await service.runtime.binding.check_health()
            engine_healthy = True
        except Exception as exc:  # noqa: BLE001 - any failure here means the engine is gone
            print(f"engine health check failed: {type(exc).__name__}: {exc}", flush=True)
            engine_healthy = False
    load.close()
    return Raw(
        calibration, rate, duration, phases, samples, steps_by_job, runtime_rows, job_states, engine_healthy, stalls,
        client_stats, {phase: cpu.view(f"{phase}_start", f"{phase}_end") for phase in ("users", "zo", "together")},
    )


def summarise(args, raw: Raw, engine, num_engine_deaths: int) -> dict:
    users = user_summary([s for s in raw.samples if s.phase == "users"], raw.phase_s)
    together = user_summary([s for s in raw.samples if s.phase == "together"], raw.phase_s)
    users["load_generator"] = raw.client_stats.get("users")
    together["load_generator"] = raw.client_stats.get("together")
    zo_alone = zo_summary(raw.steps_by_job, *raw.phases["zo"])
    zo_together = zo_summary(raw.steps_by_job, *raw.phases["together"])
    t0, t1 = raw.phases["together"]
    user_tokens = sum(
        s.num_prompt_tokens + s.num_output_tokens for s in raw.samples if s.phase == "together" and t0 <= s.done_s < t1
    )
    all_tokens = zo_together["num_tokens"] + user_tokens
    fair_errors = [e for e in (zo_alone["fair_share_error"], zo_together["fair_share_error"]) if e is not None]
    figures = {
        "user_ttft_p99_ratio": _ratio(together["ttft_p99_ms"], users["ttft_p99_ms"]),
        "user_ttft_p99_ratio_sent_on_time": _ratio(together["ttft_p99_ms_sent_on_time"], users["ttft_p99_ms_sent_on_time"]),
        "user_e2e_p99_ratio": _ratio(together["e2e_p99_ms"], users["e2e_p99_ms"]),
        "zo_steps_ratio": _ratio(zo_together["steps_per_s"], zo_alone["steps_per_s"]),
        "zo_token_share": zo_together["num_tokens"] / all_tokens if all_tokens else None,
        "fair_share_error": max(fair_errors) if fair_errors else None,
    }

    def controller_view(a: float, b: float) -> dict:
        rows = [r for r in raw.runtime_rows if a <= r["t"] < b]

        def median(key: str) -> float | None:
            values = [r[key] for r in rows if r[key] is not None]
            return float(np.median(values)) if values else None

        reasons: dict[str, int] = {}
        for r in rows:
            if r["budget_reason"]:
                reasons[r["budget_reason"]] = reasons.get(r["budget_reason"], 0) + 1
        return {
            **raw.stalls.view(a, b),
            "budget_tokens_median": median("budget_tokens"),
            "probe_tokens_in_flight_median": median("probe_tokens_in_flight"),
            "server_ttft_p95_ms_median": median("server_ttft_p95_ms"),
            "budget_reason_samples": reasons,
        }

    return {
        "benchmark": "coserve",
        **figures,
        "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()},
        "targets_met": {k: _meets(k, figures[k]) for k in TARGETS},
        "fair_share_error_by_phase": {"zo": zo_alone["fair_share_error"], "together": zo_together["fair_share_error"]},
        "paper_ttft_p99_increase": PAPER_TTFT_P99_INCREASE,
        "engine_dead_errors": num_engine_deaths,
        "engine_healthy_at_end": raw.engine_healthy,
        "user_errors": users["num_errors"] + together["num_errors"],
        "jobs_status_before_cancel": raw.job_states,
        "config": {
            "model": args.model, "dtype": args.dtype, "num_slots": args.num_slots, "output_tokens": args.output_tokens,
            "load_fraction": args.load_fraction, "rate_per_s": raw.rate_per_s, "phase_s": raw.phase_s, "seed": args.seed,
            "zo_batch_size": args.zo_batch_size, "zo_num_directions": args.zo_q,
            "coscheduler_target_ttft_ms": args.target_ttft_ms if args.target_ttft_ms is not None else "service default",
            "coscheduler_chunk_tokens": args.chunk_tokens if args.chunk_tokens is not None else "service default",
            "coscheduler_min_chunks_in_flight": args.min_chunks if args.min_chunks is not None else "service default",
            "coscheduler_hold_chunks_while_users_wait": not args.no_hold,
            "shm_busy_loop_s": "vllm default (1 s)" if args.shm_busy_loop_s is None else args.shm_busy_loop_s,
            "cpu_threads": args.cpu_threads if args.cpu_threads is not None else "service default (cores - 1)",
            "step_gate": engine.step_gate.to_dict() if engine.step_gate else "off (vLLM's scheduler)",
            "probe_lane": engine.probe_lane,
            "max_num_batched_tokens": engine.max_num_batched_tokens, "max_num_seqs": engine.max_num_seqs,
        },
        "calibration": raw.calibration,
        "phases": {
            "users": {"users": users, "controller": controller_view(*raw.phases["users"]), "cpu": raw.cpu_by_phase["users"]},
            "zo": {"zo": zo_alone, "controller": controller_view(*raw.phases["zo"]), "cpu": raw.cpu_by_phase["zo"]},
            "together": {
                "users": together, "zo": zo_together, "user_tokens": user_tokens,
                "controller": controller_view(*raw.phases["together"]), "cpu": raw.cpu_by_phase["together"],
            },
        },
    }


def _gate_arg(text: str) -> int | None:
    return None if text == "off" else int(text)


def _busy_loop_arg(text: str) -> float | None:
    return None if text == "vllm" else float(text)


async def run(args) -> tuple[dict, Raw]:
    deaths = EngineDeathCounter()
    logging.getLogger().addHandler(deaths)
    prompts = [f"{ex.text} It was" for ex in load_sst2("dev")]
    random.Random(args.seed).shuffle(prompts)
    train_rows = _rows("train", 512)
    data_dir = Path(tempfile.mkdtemp(prefix="zoserve-coserve-"))
    settings = Settings(
        data_dir=data_dir, tiny_model=args.model, dtype=args.dtype, num_slots=args.num_slots, metrics_refresh_s=1.0,
        **({"coscheduler_target_ttft_ms": args.target_ttft_ms} if args.target_ttft_ms is not None else {}),
        **({"coscheduler_chunk_tokens": args.chunk_tokens} if args.chunk_tokens is not None else {}),
        **({"coscheduler_min_chunks_in_flight": args.min_chunks} if args.min_chunks is not None else {}),
        **({"cpu_threads": args.cpu_threads} if args.cpu_threads is not None else {}),
        coscheduler_hold_chunks_while_users_wait=not args.no_hold,
        shm_busy_loop_s=args.shm_busy_loop_s,
        probe_lane=not args.no_probe_lane,
        step_gate_tokens_with_users=args.step_gate_tokens,
        **({"step_gate_tokens_with_user_prefill": args.step_gate_prefill_tokens}
           if args.step_gate_prefill_tokens is not None else {}),
    )
    started = time.time()
    # The benchmark starts the engine itself (as the tests do) so that engine arguments the service settings
    # do not expose yet can be varied; otherwise it is exactly the engine `zoserve serve` builds.
    config = engine_config(settings)
    if args.max_num_batched_tokens is not None:
        config = dataclasses.replace(config, max_num_batched_tokens=args.max_num_batched_tokens)
    binding = await EngineBinding.start(config, data_dir / "engine")
    try:
        async with Service(settings, binding) as service:
            print(f"service up on {service.url} in {time.time() - started:.1f} s", flush=True)
            raw = await measure(args, service, prompts, train_rows)
    finally:
        binding.shutdown()
    result = summarise(args, raw, config, deaths.count)
    result["wall_s"] = time.time() - started
    return result, raw


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(result: dict) -> None:
    users = result["phases"]["users"]["users"]
    together = result["phases"]["together"]["users"]
    zo, zo_t = result["phases"]["zo"]["zo"], result["phases"]["together"]["zo"]
    cal = result["calibration"]
    print(f"calibration: {cal['completions_per_s']:.1f} completions/s at concurrency {cal['concurrency']}; load {result['config']['rate_per_s']:.2f}/s")
    for name, u in (("users alone", users), ("together", together)):
        print(
            f"{name:12s} {u['num_requests']} requests ({u['num_errors']} errors, {u['num_without_text']} without text): TTFT p50 {_fmt(u['ttft_p50_ms'], '.1f')} "
            f"p99 {_fmt(u['ttft_p99_ms'], '.1f')} ms, e2e p50 {_fmt(u['e2e_p50_ms'], '.1f')} p99 {_fmt(u['e2e_p99_ms'], '.1f')} ms"
        )
    for name, z in (("zo alone", zo), ("together", zo_t)):
        shares = ", ".join(f"{k} {_fmt(j['token_share'], '.3f')}" for k, j in z["jobs"].items())
        print(f"{name:12s} ZO {z['steps_per_s']:.2f} steps/s, {z['tokens_per_s']:.0f} scoring tokens/s; token shares {shares}")
    for key in ("user_ttft_p99_ratio", "user_e2e_p99_ratio", "zo_steps_ratio", "zo_token_share", "fair_share_error"):
        met = result["targets_met"].get(key)
        note = "" if met is None else (f"  (target {result['targets'][key]}: {'met' if met else 'MISSED'})")
        print(f"{key:20s} {_fmt(result[key])}{note}")
    print(f"diagnostic: TTFT p99 ratio over requests the load generator sent on time (<= {SENT_LATE_S * 1000:.0f} ms late): "
          f"{_fmt(result['user_ttft_p99_ratio_sent_on_time'])}")
    for name in ("users", "zo", "together"):
        cpu = result["phases"][name]["cpu"]
        print(f"CPU s/s, {name:9s} " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items())))
    print(f"EngineDeadError records: {result['engine_dead_errors']}; engine healthy at end: {result['engine_healthy_at_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-opt", help="a locally built model: tiny-opt or opt-125m-shape")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-slots", type=int, default=16, help="3 users x 2 + 2 jobs x (2 serving + 2q probe) + 1")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--load-fraction", type=float, default=0.3)
    parser.add_argument("--requests-per-phase", type=int, default=600)
    parser.add_argument("--min-phase-s", type=float, default=60.0)
    parser.add_argument("--max-phase-s", type=float, default=100.0)
    parser.add_argument("--calibrate-s", type=float, default=20.0)
    parser.add_argument("--calibrate-warmup-s", type=float, default=4.0)
    parser.add_argument("--calibrate-concurrency", type=int, default=32)
    parser.add_argument("--pause-s", type=float, default=3.0, help="idle time between calibration and the first phase")
    parser.add_argument("--zo-batch-size", type=int, default=16)
    parser.add_argument("--zo-q", type=int, default=1)
    parser.add_argument("--zo-warmup-steps", type=int, default=3)
    parser.add_argument("--target-ttft-ms", type=float, default=None, help="co-scheduler TTFT target (default: the service's)")
    parser.add_argument(
        "--target-from-users", type=float, default=1.2,
        help="without --target-ttft-ms: set the co-scheduler target to this x the server-side p95 TTFT measured in the users-alone phase",
    )
    parser.add_argument("--cpu-threads", type=int, default=None, help="the engine's OpenMP threads (default: the service's, every core but one)")
    parser.add_argument(
        "--shm-busy-loop-s", type=_busy_loop_arg, default=0.0,
        help="seconds vLLM's queue readers spin after a read ('vllm': vLLM's own 1 s; default 0, the service's)",
    )
    parser.add_argument("--no-probe-lane", action="store_true", help="submit probe requests as soon as admitted")
    parser.add_argument("--no-hold", action="store_true", help="let chunks enter while a user waits for its first token")
    parser.add_argument("--min-chunks", type=int, default=None, help="co-scheduler budget floor in chunks (default: the service's)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="co-scheduler probe chunk size (default: the service's)")
    parser.add_argument(
        "--step-gate-tokens", type=_gate_arg, default=Settings().step_gate_tokens_with_users,
        help="probe tokens per engine step while users are present, or 'off' for vLLM's own scheduler",
    )
    parser.add_argument("--step-gate-prefill-tokens", type=int, default=None,
                        help="probe tokens in a step that carries a user's prefill (default: the service's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM's per-step token budget (default: the service's)")
    parser.add_argument("--rolling-window-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "results" / "coserve.png"))
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--raw-out", default=None, help="write per-request samples, step metrics and controller samples here")
    parser.add_argument("--smoke", action="store_true", help="seconds-long phases: checks the wiring, measures nothing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.calibrate_s, args.calibrate_warmup_s, args.calibrate_concurrency = 3.0, 1.0, 8
        args.min_phase_s = args.max_phase_s = 6.0
        args.zo_warmup_steps, args.pause_s, args.rolling_window_s = 1, 0.5, 2.0
    logging.basicConfig(level=logging.WARNING)
    result, raw = asyncio.run(asyncio.wait_for(run(args), 3600))
    gc.collect()  # finalise the shut-down engine now, not during interpreter teardown (noisy there)
    if args.plot:
        plot(Path(args.plot), raw.phases["users"][0], raw.phases, raw.samples, raw.steps_by_job, raw.runtime_rows, args.rolling_window_s)
    if args.raw_out:
        Path(args.raw_out).write_text(json.dumps({
            "phases": raw.phases,
            "samples": [{**asdict(s), "ttft_s": s.ttft_s, "e2e_s": s.e2e_s} for s in raw.samples],
            "steps": {adapter: steps for adapter, (_, steps) in raw.steps_by_job.items()},
            "runtime": raw.runtime_rows,
        }) + "\n")
    print_summary(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
