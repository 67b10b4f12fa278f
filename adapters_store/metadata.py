"""The metadata backend interface (Redis or embedded SQLite) and the encodings both share.

A backend owns adapter metadata, version records, snapshot references and pins. It never touches blobs:
the store writes a blob *before* the metadata transaction that references it, which is what keeps a crash
from leaving a record or snapshot reference whose blob is missing.
"""

from __future__ import annotations

import json
from typing import Protocol

from adapters_store.records import AdapterMeta, SnapshotRef, VersionRecord


class MetadataBackend(Protocol):
    async def create_adapter(self, meta: AdapterMeta, initial: SnapshotRef) -> None:
        """Adapter at head 0 with the initial snapshot. Raises AdapterExists."""

    async def get_adapter(self, name: str) -> AdapterMeta:
        """Raises AdapterNotFound."""

    async def list_adapters(self) -> list[str]: ...

    async def delete_adapter(self, name: str) -> None:
        """Drop metadata, records, snapshot references and pins. Raises AdapterNotFound."""

    async def commit(self, name: str, record: VersionRecord, snapshot: SnapshotRef | None) -> None:
        """Atomically: store the record (and snapshot ref) and move head parent → version.

        Compare-and-set: raises HeadConflict unless head == record.parent; AdapterNotFound.
        """

    async def get_records(self, name: str, first: int, last: int) -> list[VersionRecord]:
        """Records with first ≤ version ≤ last, ascending; missing versions are simply absent."""

    async def add_snapshot(self, name: str, snapshot: SnapshotRef) -> None:
        """Reference a snapshot of an existing version (≤ head). Raises VersionNotFound, AdapterNotFound."""

    async def list_snapshots(self, name: str) -> list[SnapshotRef]:
        """Ascending by version. Raises AdapterNotFound."""

    async def remove_snapshots(self, name: str, versions: list[int]) -> None: ...

    async def pin(self, name: str, version: int) -> None:
        """Raises VersionNotFound if version > head, AdapterNotFound."""

    async def unpin(self, name: str, version: int) -> None: ...

    async def list_pins(self, name: str) -> list[int]: ...

    async def close(self) -> None: ...


def snapshot_to_json(ref: SnapshotRef) -> str:
    return json.dumps([ref.blob_key, ref.sha256, ref.num_bytes, ref.created_at], separators=(",", ":"))


def snapshot_from_json(version: int, raw: str | bytes) -> SnapshotRef:
    blob_key, sha256, num_bytes, created_at = json.loads(raw)
    return SnapshotRef(version, blob_key, sha256, int(num_bytes), float(created_at))
