"""The local blob backend and the package's layering."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapters_store import BlobNotFound, InvalidArgument, LocalBlobStore, parse_address
from adapters_store.blobs import content_key, get_verified, sha256_hex
from adapters_store.errors import IntegrityError


async def test_local_blob_store_round_trip(tmp_path) -> None:
    blobs = LocalBlobStore(tmp_path)
    data = b"hello" * 100
    key = content_key(sha256_hex(data))
    assert not await blobs.exists(key)
    await blobs.put(key, data)
    await blobs.put(key, data)  # idempotent
    assert await blobs.exists(key)
    assert await get_verified(blobs, key, sha256_hex(data)) == data
    with pytest.raises(IntegrityError):
        await get_verified(blobs, key, sha256_hex(b"other"))
    assert [b.key for b in await blobs.list()] == [key]
    assert [b.num_bytes for b in await blobs.list("snapshots/")] == [len(data)]
    assert await blobs.list("nothing/") == []
    assert await blobs.delete(key) and not await blobs.delete(key)
    with pytest.raises(BlobNotFound):
        await blobs.get(key)
    assert list((tmp_path / ".tmp").iterdir()) == []  # no temp file left behind


@pytest.mark.parametrize("key", ["../x", "/abs", "a//b", "a/../b", ".tmp/x", "a b", ""])
async def test_blob_keys_cannot_escape_the_root(tmp_path, key) -> None:
    with pytest.raises(InvalidArgument):
        await LocalBlobStore(tmp_path).put(key, b"x")


def test_parse_address() -> None:
    assert parse_address("sst2") == ("sst2", None)
    assert parse_address("sst2@latest") == ("sst2", None)
    assert parse_address("sst2@12") == ("sst2", 12)
    for bad in ("sst2@-1", "sst2@x", "../a@1", "@3"):
        with pytest.raises(InvalidArgument):
            parse_address(bad)


def test_package_imports_neither_vllm_nor_http_nor_scheduler() -> None:
    code = ("import sys, adapters_store; "
            "print(sorted(m for m in ('vllm', 'fastapi', 'service', 'scheduler') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
