"""The composition root: settings → model → engine binding → store → runtime → FastAPI app."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from adapters_store import open_store
from scheduler.coscheduler_config import CoSchedulerConfig
from scheduler.engine.binding import EngineBinding
from scheduler.engine.config import PROBE_PRIORITY, EngineConfig
from scheduler.planning.step_gate import StepGateConfig
from scheduler.runtime import Runtime
from service import telemetry
from service.adapters.router import router as adapters_router
from service.auth import HealthAccess
from service.errors import install_error_handlers
from service.files.router import router as files_router
from service.files.store import FileStore
from service.heap import settle_heap
from service.inference.router import router as inference_router
from service.jobs.router import router as jobs_router
from service.settings import Settings

log = logging.getLogger("zoserve")


def resolve_model(settings: Settings) -> str:
    if settings.model:
        return settings.model
    from scheduler.models.tiny import ensure_model

    return str(ensure_model(settings.tiny_model))


def engine_config(settings: Settings) -> EngineConfig:
    return EngineConfig(
        model=resolve_model(settings),
        dtype=settings.dtype,
        num_slots=settings.num_slots,
        max_lora_rank=settings.max_lora_rank,
        target_modules=tuple(settings.target_modules),
        kv_cache_gib=settings.kv_cache_gib,
        max_model_len=settings.max_model_len,
        max_num_batched_tokens=settings.max_num_batched_tokens,
        num_cpu_threads=settings.cpu_threads or max(1, (os.cpu_count() or 1) - 1),
        shm_busy_loop_s=settings.shm_busy_loop_s,
        step_gate=step_gate_config(settings),
        probe_lane=settings.probe_lane,
        batched_scoring=settings.batched_scoring,
        worker_in_engine_core=settings.worker_in_engine_core,
        engine_nice_increment=settings.engine_nice_increment,
    )


def step_gate_config(settings: Settings) -> StepGateConfig | None:
    if settings.step_gate_tokens_with_users is None:
        return None
    return StepGateConfig(
        probe_priority=PROBE_PRIORITY,
        tokens_with_users=settings.step_gate_tokens_with_users,
        tokens_with_user_prefill=settings.step_gate_tokens_with_user_prefill,
        user_memory_s=settings.step_gate_user_memory_s,
    )


def create_app(settings: Settings | None = None, binding: EngineBinding | None = None) -> FastAPI:
    """Build the app. With `binding` given (tests), the app uses it and does not own its lifetime."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = binding is None
        data_dir = Path(settings.data_dir)
        engine = binding or await EngineBinding.start(engine_config(settings), data_dir / "engine")
        store = open_store(settings.redis_url, settings.store_dir, snapshot_every=settings.snapshot_every)
        runtime = Runtime(
            engine,
            store,
            data_dir / "journal",
            observer=telemetry.MetricsObserver(app.state.metrics),
            coscheduling=CoSchedulerConfig(
                target_ttft_ms=settings.coscheduler_target_ttft_ms,
                max_tokens_in_flight=settings.coscheduler_max_tokens_in_flight,
                chunk_tokens=settings.coscheduler_chunk_tokens,
                min_chunks_in_flight=settings.coscheduler_min_chunks_in_flight,
                fairness_max_lead_tokens=settings.coscheduler_fairness_max_lead_tokens,
                hold_chunks_while_users_wait=settings.coscheduler_hold_chunks_while_users_wait,
                min_probe_tokens_per_step=settings.coscheduler_min_probe_tokens_per_step,
            ),
            pipelined_commits=settings.pipelined_commits,
        )
        app.state.runtime = runtime
        if settings.is_open:
            log.warning("No API keys configured: the control and data planes are OPEN to anyone who can connect.")
        refresher = None
        try:
            await runtime.start()  # resumes the jobs a previous process left active
            refresher = asyncio.create_task(telemetry.refresh_forever(app.state, settings.metrics_refresh_s))
            settle_heap(settings)  # this process's collector (service/heap.py)
            if settings.freeze_gc_heap:
                await engine.freeze_heap()  # the same freeze for the process the model runs in
            app.state.ready = True
            yield
        finally:
            app.state.ready = False
            if refresher is not None:
                refresher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await refresher
            await runtime.shutdown()
            await store.close()
            if owned:
                engine.shutdown()

    app = FastAPI(title="zoserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.started_at = time.time()
    app.state.ready = False
    app.state.files = FileStore(settings.files_dir)
    # A one-element list so generation code can count in place without reaching back into app.state.
    app.state.inflight_generations = [0]
    install_error_handlers(app)
    for router in (jobs_router, files_router, adapters_router, inference_router, telemetry.router):
        app.include_router(router)

    @app.get("/healthz")
    async def healthz(_: HealthAccess) -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(_: HealthAccess) -> JSONResponse:
        ready = bool(getattr(app.state, "ready", False))
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    app.state.metrics = telemetry.new_metrics([route.path for route in app.routes])
    app.add_middleware(telemetry.HttpMetricsMiddleware, metrics=app.state.metrics)
    return app
