"""One run: the engine and the service, then the calibrate, users, zo and together phases (see bench/coserve.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import random
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import numpy as np

from scheduler.datasets import load_sst2
from scheduler.engine.binding import EngineBinding
from scheduler.engine.process_priority import engine_processes, renice
from scheduler.engine.step_trace import TRACE_ENV, StepRecord
from service.app import engine_config
from service.settings import Settings

from coserve_parts.jobs import JOBS, _rows, create_job, job_body, job_steps, wait_job
from coserve_parts.load import USER_ADAPTERS, LoadClient, UserSample, one_request, poisson_offsets
from coserve_parts.monitors import (
    EngineDeathCounter, ProcessCpu, StageRecorder, StallMonitor, pin_worker, sample_runtime,
)
from coserve_parts.service import Service
from coserve_parts.steps import load_steps
from coserve_parts.summary import summarise
from coserve_parts.ttft_path import join_paths, summarise_paths
from coserve_parts.windows import USER_PHASES, Windows, merge_counts, together_windows


@dataclass
class Raw:
    """What one run collected, before any summary."""

    calibration: dict
    rate_per_s: float
    phase_s: float
    phases: dict[str, Windows]  # name -> its measurement windows (one, or one per round with --rounds)
    samples: list[UserSample]
    steps_by_job: dict[str, tuple[float, list[dict]]]  # adapter -> (weight, step metrics from the API)
    runtime_rows: list[dict]
    job_states: dict[str, str]
    engine_healthy: bool
    stalls: StallMonitor
    client_stats: dict[str, dict]  # phase -> the load generator's own event-loop lags, over its windows
    cpu_by_phase: dict[str, dict[str, float]]  # phase -> process (and host_idle, host_steal) -> CPU seconds per second
    ttft_stages_by_phase: dict[str, dict]  # user phase -> StageRecorder.view (server-side TTFT stages)
    ttft_paths_by_phase: dict[str, dict]  # user phase -> ttft_path.summarise_paths (client and server joined)
    engine_steps: list[StepRecord] = dataclasses.field(default_factory=list)  # the engine step trace, oldest first
    cpu_by_window: dict[str, list[dict[str, float]]] = dataclasses.field(default_factory=dict)  # cpu_by_phase per window


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
        # --users-rate-per-s fixes the offered load (A/B runs: calibration drifts by ±20 % between runs here);
        # the calibration still runs and is reported.
        rate = args.users_rate_per_s or args.load_fraction * calibration["completions_per_s"]
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
        phases: dict[str, Windows] = {}
        client_stats: dict[str, list[dict]] = {}
        samples: list[UserSample] = []
        job_ids: dict[str, str] = {}
        stages = StageRecorder(service.app.state.metrics)
        block_s = duration / args.rounds

        async def window(name: str, measured) -> None:
            """One window of phase `name`: `measured()` runs it and returns its wall start."""
            cpu.begin(name)
            start = await measured()
            cpu.end(name)
            phases[name] = phases[name].add(start, start + block_s) if name in phases else Windows.of(start, start + block_s)

        async def users(name: str, round_index: int) -> float:
            """This round's share of the arrival sequence (the same in both user phases), from the load generator."""
            lo, hi = round_index * block_s, (round_index + 1) * block_s
            first = sum(1 for o in offsets if o < lo) % len(prompts)
            t0, got, stats = await load.open_loop(name, prompts[first:] + prompts[:first], [o - lo for o in offsets if lo <= o < hi])
            client_stats.setdefault(name, []).append(stats)
            samples.extend(got)
            return t0

        async def zo_alone() -> float:
            t0 = time.time()
            await asyncio.sleep(block_s)
            return t0

        try:
            for round_index in range(args.rounds):
                if round_index:
                    await pause_jobs(client, service, job_ids.values())
                print(f"phase users: users alone{_round(round_index, args.rounds)} ...", flush=True)
                await window("users", lambda: users("users", round_index))
                if round_index == 0:
                    _set_target_from_users(args, service, runtime_rows, phases["users"].start)
                    await _start_jobs(client, args, train_rows, job_ids)
                else:
                    await resume_jobs(client, job_ids.values(), args.resume_settle_s)
                print(f"phase zo: the two jobs alone{_round(round_index, args.rounds)} ...", flush=True)
                await window("zo", zo_alone)
                binding = service.runtime.binding
                if args.ab_fast_paths or args.ab_pipelined_commits:
                    plan = together_windows(True, False, round_index)
                else:
                    plan = together_windows(args.step_gate_tokens, args.ab_gate_tokens, round_index)
                for name, setting in plan:
                    if args.ab_fast_paths:
                        paths = ", ".join(await binding.fast_paths(setting)) or "vLLM's own"
                        note = f", per-step paths: {paths}"
                    elif args.ab_pipelined_commits:
                        service.runtime.pipelined_commits = setting
                        note = f", commits {'pipelined' if setting else 'before the next step'}"
                    elif setting is not None:
                        binding.gate_cap.write(setting)
                        note = f", gate {setting} tokens"
                    else:
                        note = ""
                    print(f"phase {name}: users and the two jobs{note}{_round(round_index, args.rounds)} ...", flush=True)
                    await window(name, lambda name=name: users(name, round_index))
                if args.ab_gate_tokens is not None:
                    binding.gate_cap.write(args.step_gate_tokens)
                if args.ab_fast_paths:
                    await binding.fast_paths(True)
                if args.ab_pipelined_commits:
                    service.runtime.pipelined_commits = True

            steps_by_job, job_states = {}, {}
            for adapter, weight in JOBS:
                steps_by_job[adapter] = (weight, await job_steps(client, job_ids[adapter]))
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
    user_phases = [name for name in USER_PHASES if name in phases]
    return Raw(
        calibration, rate, duration, phases, samples, steps_by_job, runtime_rows, job_states, engine_healthy, stalls,
        {phase: merge_counts(views) for phase, views in client_stats.items()},
        {phase: cpu.view(phase) for phase in phases},
        {phase: stages.view(phases[phase]) for phase in user_phases},
        {phase: _paths(samples, stages, phase, phases[phase]) for phase in user_phases},
        cpu_by_window={phase: cpu.view_by_window(phase) for phase in phases},
    )


def _paths(samples: list[UserSample], stages: StageRecorder, phase: str, windows: Windows) -> dict:
    of_phase = [s for s in samples if s.phase == phase and s.first_text_s is not None]
    return summarise_paths(join_paths(of_phase, stages.records, windows), len(of_phase))


def _set_target_from_users(args, service: Service, runtime_rows: list[dict], since: float) -> None:
    """Without --target-ttft-ms: the co-scheduler's target from the first users-alone window."""
    if args.target_ttft_ms is not None or args.target_from_users is None:
        return
    alone = [r["server_ttft_p95_ms"] for r in runtime_rows if since <= r["t"] and r["server_ttft_p95_ms"]]
    target_ms = args.target_from_users * float(np.median(alone))
    service.runtime.coscheduler.set_target_ttft_ms(target_ms)
    args.target_ttft_ms = target_ms
    print(f"co-scheduler target: {target_ms:.0f} ms p95 TTFT ({args.target_from_users} x users-alone median p95)")


async def _start_jobs(client, args, train_rows: list[dict], job_ids: dict[str, str]) -> None:
    """The two weighted jobs, each running past its warm-up steps; `job_ids` (adapter -> job id) fills as each
    is created, so the caller cancels whatever was created if a later one fails."""
    for adapter, weight in JOBS:
        body = job_body(adapter, weight, 1_000_000, args.zo_batch_size, args.zo_q, train_rows, args.zo_options)
        job_ids[adapter] = await create_job(client, body)
    for job_id in job_ids.values():
        await wait_job(client, job_id, lambda j: j["status"] == "running" and j["step"] >= args.zo_warmup_steps, 600)


def _round(index: int, rounds: int) -> str:
    return f" (round {index + 1} of {rounds})" if rounds > 1 else ""


async def pause_jobs(client, service: Service, job_ids, timeout_s: float = 120.0) -> None:
    """Pause the jobs and wait until none of their steps is in the engine any more (users alone again)."""
    for job_id in job_ids:
        (await client.post(f"/v1/jobs/{job_id}/pause")).raise_for_status()
    deadline = time.monotonic() + timeout_s
    while True:
        snapshot = service.runtime.coscheduler.snapshot()
        if snapshot.num_steps_in_flight == 0 and snapshot.num_probe_tokens_in_flight == 0:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"paused jobs still had steps in flight after {timeout_s:.0f} s: {snapshot}")
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.5)  # the steps' commits and publishes, after their last probe


async def resume_jobs(client, job_ids, settle_s: float) -> None:
    """Resume the jobs and give them `settle_s` to have steps in flight again before the zo window opens."""
    for job_id in job_ids:
        (await client.post(f"/v1/jobs/{job_id}/resume")).raise_for_status()
    await asyncio.sleep(settle_s)


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
        coscheduler_min_probe_tokens_per_step=args.min_probe_tokens_per_step,
        coscheduler_hold_chunks_while_users_wait=not args.no_hold,
        shm_busy_loop_s=args.shm_busy_loop_s,
        probe_lane=not args.no_probe_lane,
        batched_scoring=not args.no_batched_scoring,
        **({"worker_in_engine_core": args.worker_in_engine_core == "on"} if args.worker_in_engine_core else {}),
        # With an A/B of the gate, the static gate is the larger of the two and the shared cap word sets each
        # together window's own (measure()).
        step_gate_tokens_with_users=(
            args.step_gate_tokens if args.ab_gate_tokens is None else max(args.step_gate_tokens, args.ab_gate_tokens)
        ),
        **({"step_gate_tokens_with_user_prefill": args.step_gate_prefill_tokens}
           if args.step_gate_prefill_tokens is not None else {}),
    )
    started = time.time()
    # The benchmark starts the engine itself (as the tests do) so that engine arguments the service settings
    # do not expose yet can be varied; otherwise it is exactly the engine `zoserve serve` builds.
    config = engine_config(settings)
    trace_prefix = str(data_dir / "steps" / "engine-core")
    if args.step_trace:
        os.environ[TRACE_ENV] = trace_prefix  # the engine-core process reads it when vLLM spawns it
    if args.max_num_batched_tokens is not None:
        config = dataclasses.replace(config, max_num_batched_tokens=args.max_num_batched_tokens)
    binding = await EngineBinding.start(config, data_dir / "engine")
    try:
        async with Service(settings, binding) as service:
            print(f"service up on {service.url} in {time.time() - started:.1f} s", flush=True)
            if args.engine_nice is not None:
                reniced = renice(engine_processes(), args.engine_nice)  # overrides the service's +10 (A/B runs)
                print(f"engine reniced to {args.engine_nice}: {reniced}", flush=True)
            if args.pin_worker_cpus:
                print(f"pinned: {pin_worker(set(args.pin_worker_cpus), config.worker_in_engine_core)}", flush=True)
            raw = await measure(args, service, prompts, train_rows)
    finally:
        binding.shutdown()
        os.environ.pop(TRACE_ENV, None)
    if args.step_trace:
        raw.engine_steps = load_steps(trace_prefix)
    result = summarise(args, raw, config, deaths.count)
    result["wall_s"] = time.time() - started
    return result, raw
