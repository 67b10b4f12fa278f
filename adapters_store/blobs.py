"""Blob backends: opaque immutable byte strings under string keys.

The interface is deliberately narrow (put/get/delete/list/exists) so an S3-compatible backend is one more
class. Snapshot blobs are content-addressed (`content_key`), so a put is idempotent, identical states share
one blob, and a reader can always check what it got against the key's sha256.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters_store.errors import BlobNotFound, IntegrityError, InvalidArgument

_KEY_RE = re.compile(r"[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*")
_TMP_DIR = ".tmp"
_STALE_TMP_S = 3600.0  # a temp file this old belongs to a writer that died mid-put


@dataclass(frozen=True)
class BlobInfo:
    key: str
    num_bytes: int
    modified_at: float  # seconds since the epoch; GC leaves young blobs alone (a commit may be in flight)


class BlobStore(Protocol):
    async def put(self, key: str, data: bytes) -> None: ...
    async def get(self, key: str) -> bytes: ...
    async def delete(self, key: str) -> bool: ...
    async def list(self, prefix: str = "") -> list[BlobInfo]: ...
    async def exists(self, key: str) -> bool: ...


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def content_key(digest: str, prefix: str = "snapshots") -> str:
    return f"{prefix}/{digest[:2]}/{digest}"


async def get_verified(blobs: BlobStore, key: str, sha256: str) -> bytes:
    data = await blobs.get(key)
    actual = await asyncio.to_thread(sha256_hex, data)
    if actual != sha256:
        raise IntegrityError(f"blob {key!r} has sha256 {actual}, expected {sha256}")
    return data


def _check_key(key: str) -> str:
    if not _KEY_RE.fullmatch(key) or any(part in (".", "..", _TMP_DIR) for part in key.split("/")):
        raise InvalidArgument("blob_key", f"{key!r} is not a valid blob key")
    return key


class LocalBlobStore:
    """Blobs as files under `root`. A put is write-temp, fsync, rename, fsync dir: all or nothing."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        (self.root / _TMP_DIR).mkdir(parents=True, exist_ok=True)
        self._sweep_stale_temps()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def _sweep_stale_temps(self) -> None:
        cutoff = time.time() - _STALE_TMP_S
        for tmp in (self.root / _TMP_DIR).iterdir():
            try:
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()
            except FileNotFoundError:
                pass

    def _put(self, key: str, data: bytes) -> None:
        final = self._path(key)
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.root / _TMP_DIR / f"{uuid.uuid4().hex}.part"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        dir_fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)  # the rename itself must survive a power cut, not only the bytes
        finally:
            os.close(dir_fd)

    def _get(self, key: str) -> bytes:
        try:
            return self._path(key).read_bytes()
        except FileNotFoundError:
            raise BlobNotFound(key) from None

    def _delete(self, key: str) -> bool:
        try:
            self._path(key).unlink()
            return True
        except FileNotFoundError:
            return False

    def _list(self, prefix: str) -> list[BlobInfo]:
        infos = []
        for path in self.root.rglob("*"):
            rel = path.relative_to(self.root).as_posix()
            if rel.split("/", 1)[0] == _TMP_DIR or not rel.startswith(prefix):
                continue
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # deleted while listing
            if path.is_file():
                infos.append(BlobInfo(rel, st.st_size, st.st_mtime))
        return sorted(infos, key=lambda info: info.key)

    async def put(self, key: str, data: bytes) -> None:
        await asyncio.to_thread(self._put, key, data)

    async def get(self, key: str) -> bytes:
        return await asyncio.to_thread(self._get, key)

    async def delete(self, key: str) -> bool:
        return await asyncio.to_thread(self._delete, key)

    async def list(self, prefix: str = "") -> list[BlobInfo]:
        return await asyncio.to_thread(self._list, prefix)

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(self._path(key).is_file)
