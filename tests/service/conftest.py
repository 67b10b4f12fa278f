"""The service over real HTTP on the session's engine (one engine per test session)."""

from __future__ import annotations

import asyncio
import socket

import httpx
import pytest
import uvicorn

from service.app import create_app
from service.settings import Settings


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
async def service_url(engine, tmp_path_factory):
    settings = Settings(data_dir=tmp_path_factory.mktemp("service"))
    app = create_app(settings, binding=engine)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    await task


@pytest.fixture
async def client(service_url):
    async with httpx.AsyncClient(base_url=service_url, timeout=120) as http:
        yield http
