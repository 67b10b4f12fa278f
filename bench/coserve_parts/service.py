"""The service in-process, over real HTTP: uvicorn on 127.0.0.1 and a free port."""

from __future__ import annotations

import asyncio
import socket
import time

import uvicorn

from scheduler.engine.binding import EngineBinding
from service.app import create_app
from service.settings import Settings


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
