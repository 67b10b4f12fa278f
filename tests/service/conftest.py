"""The service over real HTTP on the session's engine (one engine per test session).

Each test module gets its own app (own runtime, store and data dir) on the shared engine binding, so a
module's jobs and adapters never leak into another's slot budget.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest

from service_harness import ADMIN_KEY, INFERENCE_KEY, ROOT_KEY, client_for, running_service, service_settings


@pytest.fixture(scope="module")
async def service_url(engine, tmp_path_factory) -> AsyncIterator[str]:
    async with running_service(service_settings(tmp_path_factory.mktemp("service")), engine) as url:
        yield url


@pytest.fixture
async def client(service_url) -> AsyncIterator[httpx.AsyncClient]:
    """Both planes (root key)."""
    async with client_for(service_url, ROOT_KEY) as http:
        yield http


@pytest.fixture
async def admin(service_url) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(service_url, ADMIN_KEY) as http:
        yield http


@pytest.fixture
async def user(service_url) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(service_url, INFERENCE_KEY) as http:
        yield http


@pytest.fixture
async def anonymous(service_url) -> AsyncIterator[httpx.AsyncClient]:
    async with client_for(service_url, None) as http:
        yield http
