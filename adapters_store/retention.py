"""Pure planning for replay, retention and garbage collection: no I/O, unit-testable with plain values.

Replay: a version's state is its nearest snapshot on its own ancestry plus the UPDATE records after it. A
ROLLBACK record contributes no arithmetic: its state is that of `rollback_to`, so the walk jumps there.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass

from adapters_store.blobs import BlobInfo
from adapters_store.records import RecordKind, VersionRecord


@dataclass(frozen=True)
class ReplayPlan:
    base: int  # version whose snapshot is loaded
    updates: tuple[VersionRecord, ...]  # applied in this order (ascending versions)


@dataclass(frozen=True)
class MissingRecord:
    version: int  # the walk needs this version's record, which the caller has not supplied


def plan_replay(
    target: int, snapshot_versions: Collection[int], records: Mapping[int, VersionRecord]
) -> ReplayPlan | MissingRecord:
    updates: list[VersionRecord] = []
    version = target
    while version not in snapshot_versions:
        record = records.get(version)
        if record is None:
            return MissingRecord(version)
        if record.kind == RecordKind.ROLLBACK and record.rollback_to is not None:
            version = record.rollback_to
        else:
            updates.append(record)
            version = record.parent
    return ReplayPlan(version, tuple(reversed(updates)))


def snapshots_to_drop(
    snapshot_versions: Iterable[int], protected_bases: Iterable[int], keep_last: int
) -> list[int]:
    """Keep the newest `keep_last` snapshots and every base a protected version (head, pins) replays from."""
    ordered = sorted(set(snapshot_versions))
    keep = set(ordered[-keep_last:] if keep_last > 0 else []) | set(protected_bases)
    return [v for v in ordered if v not in keep]


def unreferenced_blobs(blobs: Iterable[BlobInfo], referenced: Collection[str], now: float, grace_s: float) -> list[str]:
    """Blobs nothing references and old enough that no commit can still be about to reference them.

    A commit writes its blob before its metadata transaction, so a young unreferenced blob may belong to a
    commit in flight; the grace period must exceed any commit's blob-to-metadata time.
    """
    return [b.key for b in blobs if b.key not in referenced and now - b.modified_at > grace_s]
