"""The composition root: settings → model → engine binding → runtime → FastAPI app."""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.responses import JSONResponse

from scheduler.engine.binding import EngineBinding
from scheduler.engine.config import EngineConfig
from scheduler.runtime import Runtime
from service import routes_jobs, routes_openai
from service.errors import install_error_handlers
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
    )


def create_app(settings: Settings | None = None, binding: EngineBinding | None = None) -> FastAPI:
    """Build the app. With `binding` given (tests), the app uses it and does not own its lifetime."""
    settings = settings or Settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        owned = binding is None
        engine = binding or await EngineBinding.start(engine_config(settings), Path(settings.data_dir) / "engine")
        runtime = Runtime(engine)
        app.state.runtime = runtime
        app.state.ready = True
        if not settings.admin_api_keys and not settings.inference_api_keys:
            log.warning("No API keys configured: the control and data planes are OPEN to anyone who can connect.")
        try:
            yield
        finally:
            app.state.ready = False
            await runtime.shutdown()
            if owned:
                engine.shutdown()

    app = FastAPI(title="zoserve", version="0.1.0", lifespan=lifespan)
    app.state.settings = settings
    app.state.started_at = time.time()
    app.state.ready = False
    install_error_handlers(app)
    app.include_router(routes_jobs.router)
    app.include_router(routes_openai.router)

    @app.get("/healthz")
    async def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> JSONResponse:
        ready = bool(getattr(app.state, "ready", False))
        return JSONResponse({"ready": ready}, status_code=200 if ready else 503)

    return app
