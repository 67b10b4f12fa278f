"""Store fixtures: every store test runs once per metadata backend (embedded SQLite, real Redis).

Redis is shared with other people: each test gets its own key prefix and deletes exactly its keys.
"""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import redis

from adapters_store import AdapterStore, open_store

REDIS_URL = "redis://127.0.0.1:6379/0"


def _redis_alive() -> bool:
    try:
        return redis.Redis.from_url(REDIS_URL, socket_timeout=1).ping()
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url() -> str:
    if not _redis_alive():
        server = shutil.which("redis-server")
        if server is None:
            pytest.skip("no Redis on 127.0.0.1:6379 and no redis-server to start")
        subprocess.run([server, "--port", "6379", "--save", "", "--appendonly", "no", "--daemonize", "yes"],
                       check=True)
        deadline = time.monotonic() + 10
        while not _redis_alive():
            if time.monotonic() > deadline:
                pytest.fail("redis-server did not come up on 127.0.0.1:6379")
            time.sleep(0.05)
    return REDIS_URL


def delete_prefix(url: str, prefix: str) -> None:
    client = redis.Redis.from_url(url)
    try:
        keys = list(client.scan_iter(match=f"{prefix}*", count=1000))
        if keys:
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def key_prefix(request: pytest.FixtureRequest, redis_url: str):
    prefix = f"zoserve-test:store:{uuid.uuid4().hex}:"
    yield prefix
    delete_prefix(redis_url, prefix)


@pytest.fixture(params=["sqlite", "redis"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def store_url(backend: str, redis_url: str) -> str | None:
    """The `redis_url` argument of open_store for this backend (None → SQLite)."""
    return redis_url if backend == "redis" else None


@pytest.fixture
async def make_store(store_url: str | None, tmp_path: Path, key_prefix: str) -> AsyncIterator[Callable[..., AdapterStore]]:
    """open_store over this test's data dir and key prefix; every store opened is closed afterwards."""
    opened: list[AdapterStore] = []

    def make(**options) -> AdapterStore:
        store = open_store(store_url, tmp_path / "data", key_prefix=key_prefix, **options)
        opened.append(store)
        return store

    yield make
    for store in opened:
        await store.close()


@pytest.fixture
async def store(make_store: Callable[..., AdapterStore]) -> AdapterStore:
    return make_store(snapshot_every=5, keep_snapshots=2, gc_grace_s=0.0)
