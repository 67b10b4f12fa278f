"""Retention and GC: pure planning, then the same rules through both backends."""

from __future__ import annotations

import pytest
from store_helpers import assert_theta_equal, create, mezo_applier, run_steps, small_layout

from adapters_store import BlobInfo, RecordKind, VersionNotFound, VersionRecord
from adapters_store.retention import MissingRecord, ReplayPlan, plan_replay, snapshots_to_drop, unreferenced_blobs


def _update(version: int) -> VersionRecord:
    return VersionRecord(version=version, parent=version - 1, step=version, seeds=(version,), coeffs=(1.0,))


def test_plan_replay_walks_to_nearest_snapshot_and_through_rollbacks() -> None:
    records = {v: _update(v) for v in range(1, 8)}
    records[8] = VersionRecord(version=8, parent=7, step=2, kind=RecordKind.ROLLBACK, rollback_to=2)
    records[9] = _update(9)
    plan = plan_replay(6, {0, 5}, records)
    assert plan == ReplayPlan(5, (records[6],))
    plan = plan_replay(9, {0, 5}, records)
    assert plan == ReplayPlan(0, (records[1], records[2], records[9]))
    assert plan_replay(5, {0, 5}, records) == ReplayPlan(5, ())
    assert plan_replay(4, {5}, {}) == MissingRecord(4)


def test_snapshots_to_drop_keeps_newest_and_protected() -> None:
    assert snapshots_to_drop([0, 5, 10, 15, 20], [], keep_last=2) == [0, 5, 10]
    assert snapshots_to_drop([0, 5, 10, 15, 20], [5], keep_last=2) == [0, 10]
    assert snapshots_to_drop([0], [], keep_last=1) == []


def test_unreferenced_blobs_respects_grace() -> None:
    blobs = [BlobInfo("a", 1, 100.0), BlobInfo("b", 1, 100.0), BlobInfo("c", 1, 195.0)]
    assert unreferenced_blobs(blobs, {"a"}, now=200.0, grace_s=10.0) == ["b"]


async def test_retention_keeps_last_n_and_pins_then_gc_removes_blobs(store) -> None:
    """snapshot_every=5, keep_snapshots=2 (conftest). Pin 7 → its base snapshot 5 survives."""
    layout = small_layout()
    apply = mezo_applier(layout)
    live = await create(store, "ret", layout)
    history = await run_steps(store, "ret", layout, live, 23)
    await store.pin("ret", 7)
    assert await store.list_pins("ret") == [7]
    assert await store.apply_retention("ret") == [0, 10]
    assert [s.version for s in await store.metadata.list_snapshots("ret")] == [5, 15, 20]
    deleted = await store.collect_garbage()
    assert len(deleted) == 2
    blob_keys = {b.key for b in await store.blobs.list()}
    assert blob_keys == {s.blob_key for s in await store.metadata.list_snapshots("ret")}
    for version in (5, 7, 9, 15, 23):  # every record is kept: anything above a kept snapshot rebuilds
        assert_theta_equal((await store.materialize("ret", version, apply)).theta, history[version])
    with pytest.raises(VersionNotFound, match="cannot be rebuilt"):
        await store.materialize("ret", 3, apply)
    await store.unpin("ret", 7)
    assert await store.apply_retention("ret") == [5]
    await store.check("ret")


async def test_retention_protects_head_after_rollback(store) -> None:
    """After a rollback the head's base is the rollback snapshot itself, older snapshots may go."""
    layout = small_layout()
    apply = mezo_applier(layout)
    live = await create(store, "rh", layout)
    history = await run_steps(store, "rh", layout, live, 16)
    await store.rollback("rh", 2, apply)  # version 17, snapshotted
    await store.apply_retention("rh")
    await store.collect_garbage()
    assert_theta_equal((await store.materialize("rh", "latest", apply)).theta, history[2])
    await store.check("rh")


async def test_gc_leaves_young_orphans_alone(make_store) -> None:
    store = make_store(gc_grace_s=3600.0)
    await store.blobs.put("snapshots/zz/orphan", b"x")
    assert await store.collect_garbage() == []
    assert await store.blobs.exists("snapshots/zz/orphan")
