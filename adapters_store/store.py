"""`AdapterStore`: versioned adapter states over a metadata backend and a blob backend.

Write order is what makes a commit crash-consistent: the snapshot blob (if any) is written and fsynced
first, then one metadata transaction stores the record, the snapshot reference and moves the head by
compare-and-set. A crash before the transaction leaves version N plus an orphan blob (GC removes it); after
it, version N+1 complete. Replay arithmetic is injected (`apply_record`), so this package never imports the
optimiser code; the caller passes the same function the engine worker uses and gets bit-identical θ.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import torch

from adapters_store.blobs import BlobStore, content_key, get_verified, sha256_hex
from adapters_store.errors import HeadConflict, IntegrityError, InvalidArgument, StoreError, VersionNotFound
from adapters_store.metadata import MetadataBackend
from adapters_store.peft_format import write_peft_dir
from adapters_store.records import (
    AdapterCommit,
    AdapterMeta,
    AdapterState,
    RecordKind,
    SnapshotRef,
    VersionRecord,
    validate_name,
    validate_version,
)
from adapters_store.retention import ReplayPlan, plan_replay, snapshots_to_drop, unreferenced_blobs
from adapters_store.snapshots import decode_state, encode_state

_ARTIFACTS = "artifacts"  # blob prefix of job artifacts (`put_artifact`)
ROLLBACK_ATTEMPTS = 20  # commits a rollback tries while other writers keep moving the head

# apply_record(theta, optimizer_state, record): redo one UPDATE record in place on fp32 CPU tensors.
ApplyRecord = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], VersionRecord], None]


class AdapterStore:
    def __init__(
        self,
        metadata: MetadataBackend,
        blobs: BlobStore,
        *,
        snapshot_every: int = 50,
        keep_snapshots: int = 3,
        gc_grace_s: float = 600.0,
    ) -> None:
        if snapshot_every < 1 or keep_snapshots < 1:
            raise InvalidArgument("snapshot_every", "snapshot_every and keep_snapshots must be ≥ 1")
        self.metadata = metadata
        self.blobs = blobs
        self.snapshot_every = snapshot_every
        self.keep_snapshots = keep_snapshots
        self.gc_grace_s = gc_grace_s

    # -- adapters ---------------------------------------------------------------------------------------------

    async def create_adapter(
        self,
        name: str,
        *,
        base_model: str,
        rank: int,
        alpha: float,
        target_modules: tuple[str, ...],
        initial: AdapterState,
    ) -> AdapterMeta:
        """A new adapter at version 0 whose state is `initial` (AdapterExists if the name is taken)."""
        validate_name(name)
        if rank < 1 or not target_modules:
            raise InvalidArgument("rank", "rank must be ≥ 1 and target_modules non-empty")
        meta = AdapterMeta(name, base_model, int(rank), float(alpha), tuple(target_modules), time.time(), 0)
        await self.metadata.create_adapter(meta, await self._put_snapshot(name, 0, initial))
        return meta

    async def get_adapter(self, name: str) -> AdapterMeta:
        return await self.metadata.get_adapter(validate_name(name))

    async def list_adapters(self) -> list[str]:
        return await self.metadata.list_adapters()

    async def delete_adapter(self, name: str) -> None:
        """Forget the adapter; its blobs go at the next `collect_garbage`."""
        await self.metadata.delete_adapter(validate_name(name))

    async def resolve(self, name: str, version: int | str | None = None) -> int:
        """A concrete version number for `version`, which may be an int, its decimal string, "latest" or None."""
        meta = await self.get_adapter(name)
        if version is None or version == "latest":
            return meta.head
        if isinstance(version, str):
            if not version.isdigit():
                raise InvalidArgument("version", f"{version!r} is neither a version number nor 'latest'")
            version = int(version)
        validate_version(version)
        if version > meta.head:
            raise VersionNotFound(name, version)
        return version

    # -- commits and snapshots ----------------------------------------------------------------------------------

    def snapshot_due(self, version: int) -> bool:
        """Whether the step loop should hand its state to `commit` for this version (every K steps)."""
        return version % self.snapshot_every == 0

    async def commit(self, name: str, record: VersionRecord, state: AdapterState | None = None) -> AdapterCommit:
        """Make `record` the head (CAS against record.parent); with `state`, snapshot it in the same commit.

        Raises HeadConflict if the head is not record.parent (another writer, or a rollback, got there first).
        """
        validate_name(name)
        snapshot = None if state is None else await self._put_snapshot(name, record.version, state)
        await self.metadata.commit(name, record, snapshot)
        return AdapterCommit(record, snapshot)

    async def snapshot(self, name: str, version: int, state: AdapterState) -> SnapshotRef:
        """Snapshot an already committed version (e.g. the head at job end). `state` must be that version's."""
        validate_name(name)
        validate_version(version)
        ref = await self._put_snapshot(name, version, state)
        await self.metadata.add_snapshot(name, ref)
        return ref

    async def _put_snapshot(self, name: str, version: int, state: AdapterState) -> SnapshotRef:
        def encode() -> tuple[bytes, str]:
            data = encode_state(state)
            return data, sha256_hex(data)

        data, digest = await asyncio.to_thread(encode)  # one thread hop: ~1 ms of CPU for a 1 MB θ
        key = content_key(digest)
        # Always (re)write, even if the content exists: it refreshes the blob's age, so a concurrent GC's
        # grace period protects a blob this commit is about to reference again.
        await self.blobs.put(key, data)
        return SnapshotRef(version, key, digest, len(data), time.time())

    async def get_record(self, name: str, version: int) -> VersionRecord:
        validate_name(name)
        records = await self.metadata.get_records(name, validate_version(version), version)
        if not records:
            await self.metadata.get_adapter(name)  # AdapterNotFound takes precedence
            raise VersionNotFound(name, version)
        return records[0]

    async def list_records(self, name: str, first: int, last: int) -> list[VersionRecord]:
        return await self.metadata.get_records(validate_name(name), first, last)

    # -- materialise, export, rollback --------------------------------------------------------------------------

    async def _plan(self, name: str, version: int, snapshots: dict[int, SnapshotRef]) -> ReplayPlan:
        records: dict[int, VersionRecord] = {}
        while True:
            plan = plan_replay(version, snapshots, records)
            if isinstance(plan, ReplayPlan):
                return plan
            missing = plan.version
            # Fetch every record between the nearest snapshot below and the one we need: one round trip.
            floor = max((v for v in snapshots if v < missing), default=0)
            fetched = await self.metadata.get_records(name, floor + 1, missing)
            records.update((r.version, r) for r in fetched)
            if missing not in records:
                raise VersionNotFound(name, version, f"cannot be rebuilt (no snapshot or record for {missing})")

    async def materialize(self, name: str, version: int | str | None, apply_record: ApplyRecord) -> AdapterState:
        """The state at `version`: nearest snapshot on its ancestry, then its UPDATE records replayed."""
        target = await self.resolve(name, version)
        snapshots = {s.version: s for s in await self.metadata.list_snapshots(name)}
        plan = await self._plan(name, target, snapshots)
        state = await self._load_snapshot(snapshots[plan.base])
        for record in plan.updates:
            apply_record(state.theta, state.optimizer_state, record)
        return state

    async def _load_snapshot(self, ref: SnapshotRef) -> AdapterState:
        data = await get_verified(self.blobs, ref.blob_key, ref.sha256)
        return await asyncio.to_thread(decode_state, data)

    async def export_peft(
        self, name: str, version: int | str | None, out_dir: Path, apply_record: ApplyRecord
    ) -> Path:
        """Write the version as a PEFT directory (adapter_config.json + adapter_model.safetensors).

        `out_dir` is chosen by trusted code (the service), never by an API caller.
        """
        meta = await self.get_adapter(name)
        state = await self.materialize(name, version, apply_record)
        return await asyncio.to_thread(write_peft_dir, state.theta, meta.peft_config(), Path(out_dir))

    async def rollback(
        self, name: str, to_version: int, apply_record: ApplyRecord, *, expected_head: int | None = None
    ) -> AdapterCommit:
        """A new head whose state equals `to_version` (history kept): a ROLLBACK record plus its snapshot.

        The snapshot makes the new head independent of the old version's snapshots under retention. The new
        state does not depend on the head, so without `expected_head` a rollback that loses the head to another
        writer (a job still training the adapter) goes on top of the new head, up to `ROLLBACK_ATTEMPTS` times;
        with it, HeadConflict is raised as for any commit.
        """
        head = (await self.get_adapter(name)).head if expected_head is None else expected_head
        validate_version(to_version, "to_version")
        if to_version >= head:
            raise InvalidArgument("to_version", f"{to_version} is not earlier than the head {head}")
        state = await self.materialize(name, to_version, apply_record)
        step = 0 if to_version == 0 else (await self.get_record(name, to_version)).step
        attempts = 0
        while True:
            record = VersionRecord(
                version=head + 1, parent=head, step=step, optimizer="rollback",
                kind=RecordKind.ROLLBACK, rollback_to=to_version,
            )
            try:
                return await self.commit(name, record, state)
            except HeadConflict:
                attempts += 1
                if expected_head is not None or attempts == ROLLBACK_ATTEMPTS:
                    raise
                head = (await self.get_adapter(name)).head

    # -- artifacts ----------------------------------------------------------------------------------------------

    async def put_artifact(self, data: bytes) -> str:
        """Store a job artifact (e.g. direction scales or masks) by content; returns its id, the sha256 hex.

        Version records name artifacts by id, so artifacts are never garbage-collected.
        """
        digest = await asyncio.to_thread(sha256_hex, data)
        key = content_key(digest, _ARTIFACTS)
        if not await self.blobs.exists(key):
            await self.blobs.put(key, data)
        return digest

    async def get_artifact(self, artifact_id: str) -> bytes:
        if len(artifact_id) != 64 or any(c not in "0123456789abcdef" for c in artifact_id):
            raise InvalidArgument("artifact_id", f"{artifact_id!r} is not an artifact id (sha256 hex)")
        return await get_verified(self.blobs, content_key(artifact_id, _ARTIFACTS), artifact_id)

    # -- pins, retention, GC ------------------------------------------------------------------------------------

    async def pin(self, name: str, version: int) -> None:
        await self.metadata.pin(validate_name(name), validate_version(version))

    async def unpin(self, name: str, version: int) -> None:
        await self.metadata.unpin(validate_name(name), validate_version(version))

    async def list_pins(self, name: str) -> list[int]:
        return await self.metadata.list_pins(validate_name(name))

    async def apply_retention(self, name: str) -> list[int]:
        """Drop snapshot references beyond the newest `keep_snapshots`, except those the head or a pin needs."""
        head = (await self.get_adapter(name)).head
        snapshots = {s.version: s for s in await self.metadata.list_snapshots(name)}
        bases = set()
        for version in {head, *await self.metadata.list_pins(name)}:
            try:
                bases.add((await self._plan(name, version, snapshots)).base)
            except VersionNotFound:
                pass  # already not rebuildable: nothing retention could protect
        dropped = snapshots_to_drop(snapshots, bases, self.keep_snapshots)
        await self.metadata.remove_snapshots(name, dropped)
        return dropped

    async def collect_garbage(self) -> list[str]:
        """Delete blobs no adapter references (and older than the grace period). Returns the deleted keys."""
        blobs = await self.blobs.list()  # listed before references are read: see retention.unreferenced_blobs
        blobs = [b for b in blobs if not b.key.startswith(f"{_ARTIFACTS}/")]  # named by version records
        referenced: set[str] = set()
        for name in await self.metadata.list_adapters():
            try:
                referenced.update(s.blob_key for s in await self.metadata.list_snapshots(name))
            except StoreError:
                continue  # deleted meanwhile
        doomed = unreferenced_blobs(blobs, referenced, time.time(), self.gc_grace_s)
        for key in doomed:
            await self.blobs.delete(key)
        return doomed

    # -- invariants ---------------------------------------------------------------------------------------------

    async def check(self, name: str) -> None:
        """Raise IntegrityError unless: records 1..head exist and chain, every snapshot blob exists and hashes
        right, and the head has a replay plan."""
        head = (await self.get_adapter(name)).head
        records = await self.metadata.get_records(name, 1, head)
        problems = []
        if [r.version for r in records] != list(range(1, head + 1)):
            problems.append(f"records do not cover 1..{head}")
        problems += [f"record {r.version} has parent {r.parent}" for r in records if r.parent != r.version - 1]
        snapshots = await self.metadata.list_snapshots(name)
        for ref in snapshots:
            if ref.version > head:
                problems.append(f"snapshot {ref.version} is above head {head}")
            try:
                await get_verified(self.blobs, ref.blob_key, ref.sha256)
            except IntegrityError as exc:
                problems.append(f"snapshot {ref.version}: {exc}")
        try:
            await self._plan(name, head, {s.version: s for s in snapshots})
        except VersionNotFound as exc:
            problems.append(str(exc))
        if problems:
            raise IntegrityError(f"adapter {name!r}: " + "; ".join(problems))

    async def close(self) -> None:
        await self.metadata.close()
