"""Helpers shared by the service tests: start an app over real HTTP on a given engine, wait for jobs.

Keys: `admin-key` (control plane), `inference-key` (data plane), `root-key` (both, for tests that drive both
planes).
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import httpx
import uvicorn

from scheduler.datasets import load_sst2
from service.app import create_app
from service.settings import Settings

ADMIN_KEY = "admin-key"
INFERENCE_KEY = "inference-key"
ROOT_KEY = "root-key"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def service_settings(data_dir: Path, **overrides) -> Settings:
    return Settings(
        data_dir=data_dir,
        admin_api_keys=[ADMIN_KEY, ROOT_KEY],
        inference_api_keys=[INFERENCE_KEY, ROOT_KEY],
        metrics_refresh_s=0.2,
        max_upload_bytes=256 * 1024,
        **overrides,
    )


@asynccontextmanager
async def running_service(settings: Settings, engine) -> AsyncIterator[str]:
    """A uvicorn server for a fresh app on `engine`; on exit the app's runtime shuts down (jobs stop, not cancel)."""
    async with running_app(settings, engine) as (_, url):
        yield url


@asynccontextmanager
async def running_app(settings: Settings, engine) -> AsyncIterator[tuple]:
    """`running_service`, yielding (the app, its URL) for tests that look at the app's state."""
    app = create_app(settings, binding=engine)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
            raise RuntimeError("uvicorn exited before it started")
        await asyncio.sleep(0.05)
    try:
        yield app, f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


def client_for(url: str, key: str | None) -> httpx.AsyncClient:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.AsyncClient(base_url=url, timeout=120, headers=headers)


def sst2_rows(limit: int = 64) -> list[dict]:
    return [{"text": ex.text, "label": ex.label} for ex in load_sst2("train", limit=limit)]


def job_body(adapter: str, max_steps: int, **overrides) -> dict:
    body = {
        "adapter": adapter,
        "hyperparameters": {"learning_rate": 1e-3, "eps": 1e-2, "num_directions": 1, "batch_size": 4, "max_steps": max_steps},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training_data": sst2_rows(),
        "seed": 3,
    }
    body.update(overrides)
    return body


async def wait_for_job(client: httpx.AsyncClient, job_id: str, predicate, timeout_s: float = 300.0) -> dict:
    """Poll GET /v1/jobs/{id} until `predicate(job)`; the job's JSON."""

    async def poll() -> dict:
        while True:
            reply = await client.get(f"/v1/jobs/{job_id}")
            reply.raise_for_status()
            job = reply.json()
            if predicate(job):
                return job
            if job["status"] in ("failed",) and not predicate(job):
                raise AssertionError(f"job failed: {job}")
            await asyncio.sleep(0.1)

    return await asyncio.wait_for(poll(), timeout_s)
