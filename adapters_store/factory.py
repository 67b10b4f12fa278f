"""Choose the backends: Redis metadata when a URL is given, else embedded SQLite; blobs under data_dir."""

from __future__ import annotations

from pathlib import Path

from adapters_store.blobs import LocalBlobStore
from adapters_store.keys import DEFAULT_PREFIX, RedisKeys
from adapters_store.metadata_redis import RedisMetadata
from adapters_store.metadata_sqlite import SqliteMetadata
from adapters_store.store import AdapterStore

SQLITE_FILE = "metadata.sqlite3"
BLOBS_DIR = "blobs"


def open_store(
    redis_url: str | None,
    data_dir: Path,
    *,
    key_prefix: str = DEFAULT_PREFIX,
    snapshot_every: int = 50,
    keep_snapshots: int = 3,
    gc_grace_s: float = 600.0,
) -> AdapterStore:
    """An `AdapterStore`; close it with `await store.close()`.

    With Redis, every replica must see the same blob directory (shared volume) until an S3 backend exists.
    """
    data_dir = Path(data_dir)
    if redis_url:
        metadata = RedisMetadata.from_url(redis_url, RedisKeys(key_prefix))
    else:
        metadata = SqliteMetadata(data_dir / SQLITE_FILE)
    return AdapterStore(
        metadata,
        LocalBlobStore(data_dir / BLOBS_DIR),
        snapshot_every=snapshot_every,
        keep_snapshots=keep_snapshots,
        gc_grace_s=gc_grace_s,
    )
