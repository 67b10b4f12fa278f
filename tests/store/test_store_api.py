"""Store semantics against both metadata backends: aliases, rollback, pins, CAS, errors, integrity."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest
from store_helpers import assert_theta_equal, create, initial, mezo_applier, run_steps, small_layout, step_record

from adapters_store import (
    AdapterExists,
    AdapterNotFound,
    AdapterState,
    HeadConflict,
    IntegrityError,
    InvalidArgument,
    RecordKind,
    StoreError,
    VersionNotFound,
)


async def test_metadata_and_head(store) -> None:
    layout = small_layout()
    live = await create(store, "meta", layout)
    meta = await store.get_adapter("meta")
    assert (meta.head, meta.rank, meta.alpha, meta.base_model) == (0, 4, 8.0, "tiny")
    assert meta.target_modules == ("q_proj", "v_proj")
    await run_steps(store, "meta", layout, live, 3)
    assert (await store.get_adapter("meta")).head == 3
    assert await store.list_adapters() == ["meta"]
    record = await store.get_record("meta", 2)
    assert record == dataclasses.replace(step_record(step=2, parent=1), created_at=record.created_at)
    assert (record.version, record.parent, record.step, record.batch_id) == (2, 1, 2, 32)
    assert await store.resolve("meta", "latest") == 3
    assert await store.resolve("meta", "2") == 2


async def test_create_twice_is_adapter_exists(store) -> None:
    await create(store, "dup", small_layout())
    with pytest.raises(AdapterExists):
        await create(store, "dup", small_layout())


async def test_unknown_adapter_and_version(store) -> None:
    layout = small_layout()
    apply = mezo_applier(layout)
    for call in (
        store.get_adapter("nope"),
        store.materialize("nope", 0, apply),
        store.get_record("nope", 1),
        store.pin("nope", 0),
        store.delete_adapter("nope"),
        store.commit("nope", step_record(1, 0)),
    ):
        with pytest.raises(AdapterNotFound):
            await call
    await create(store, "known", layout)
    for call in (store.materialize("known", 1, apply), store.get_record("known", 1), store.pin("known", 5)):
        with pytest.raises(VersionNotFound):
            await call
    for call in (
        store.get_adapter("../etc"),
        store.materialize("known", -1, apply),
        store.materialize("known", "newest", apply),
        store.rollback("known", 0, apply),  # nothing earlier than head 0
    ):
        with pytest.raises(InvalidArgument):
            await call
    with pytest.raises(StoreError):  # one root type for the service to map
        await store.get_adapter("nope")


def test_record_rejects_bad_fields() -> None:
    with pytest.raises(InvalidArgument, match="version"):
        step_record(1, 0).__class__(version=3, parent=1, step=1)
    with pytest.raises(InvalidArgument, match="seeds"):
        dataclasses.replace(step_record(1, 0), seeds=(-1,))
    with pytest.raises(InvalidArgument, match="coeffs"):
        dataclasses.replace(step_record(1, 0), coeffs=(float("nan"),))


async def test_head_is_compare_and_set(store) -> None:
    layout = small_layout()
    live = await create(store, "cas", layout)
    await run_steps(store, "cas", layout, live, 2)
    with pytest.raises(HeadConflict) as info:
        await store.commit("cas", step_record(step=2, parent=1))  # stale writer still at 1
    assert (info.value.expected, info.value.actual) == (1, 2)
    assert (await store.get_adapter("cas")).head == 2


async def test_concurrent_commits_exactly_one_wins(store) -> None:
    await create(store, "race", small_layout())
    results = await asyncio.gather(
        *(store.commit("race", step_record(step=1, parent=0)) for _ in range(8)), return_exceptions=True
    )
    assert sum(not isinstance(r, Exception) for r in results) == 1
    assert all(isinstance(r, HeadConflict) for r in results if isinstance(r, Exception))


async def test_rollback_makes_old_state_the_new_head(store) -> None:
    layout = small_layout()
    apply = mezo_applier(layout)
    live = await create(store, "rb", layout)
    history = await run_steps(store, "rb", layout, live, 12)
    commit = await store.rollback("rb", 7, apply)
    assert commit.record.version == 13 and commit.record.kind == RecordKind.ROLLBACK
    assert commit.record.rollback_to == 7 and commit.snapshot is not None
    assert (await store.get_adapter("rb")).head == 13
    assert_theta_equal((await store.materialize("rb", 13, apply)).theta, history[7])
    assert_theta_equal((await store.materialize("rb", 12, apply)).theta, history[12])  # history kept
    # Training continues from the rolled-back state.
    live = history[7]
    more = await run_steps(store, "rb", layout, live, 4)
    assert_theta_equal((await store.materialize("rb", 17, apply)).theta, more[17])
    # A writer that had not seen the rollback is refused.
    with pytest.raises(HeadConflict):
        await store.rollback("rb", 3, apply, expected_head=12)
    await store.check("rb")


async def test_a_rollback_losing_the_head_to_a_training_job_goes_on_top_of_its_step(store, monkeypatch) -> None:
    """A job still commits steps while the rollback builds its state: the rollback lands on the new head
    instead of failing; asked for a specific head, it still refuses."""
    layout = small_layout()
    apply = mezo_applier(layout)
    live = await create(store, "rb-race", layout)
    history = await run_steps(store, "rb-race", layout, live, 6)
    materialize = store.materialize

    async def a_job_steps_meanwhile(name, version, apply_record):  # two steps land while the state is built
        state = await materialize(name, version, apply_record)
        live_now = {k: v.clone() for k, v in history[max(history)].items()}
        history.update(await run_steps(store, "rb-race", layout, live_now, 2))
        return state

    monkeypatch.setattr(store, "materialize", a_job_steps_meanwhile)
    commit = await store.rollback("rb-race", 2, apply)
    assert commit.record.kind == RecordKind.ROLLBACK and (commit.record.parent, commit.record.version) == (8, 9)
    monkeypatch.undo()
    assert_theta_equal((await store.materialize("rb-race", 9, apply)).theta, history[2])
    assert_theta_equal((await store.materialize("rb-race", 8, apply)).theta, history[8])
    await store.check("rb-race")
    with pytest.raises(HeadConflict):  # a caller that named the head it saw is refused once the head moved
        await store.rollback("rb-race", 1, apply, expected_head=8)


async def test_rollback_replays_through_record_without_its_snapshot(store) -> None:
    """Even with the rollback snapshot gone, the ROLLBACK record alone rebuilds the state."""
    layout = small_layout()
    apply = mezo_applier(layout)
    live = await create(store, "rb2", layout)
    history = await run_steps(store, "rb2", layout, live, 8)
    await store.rollback("rb2", 3, apply)
    await store.metadata.remove_snapshots("rb2", [9])
    assert_theta_equal((await store.materialize("rb2", 9, apply)).theta, history[3])


async def test_snapshot_of_committed_version_and_optimizer_state(store) -> None:
    import torch

    layout = small_layout()
    live = await create(store, "opt", layout)
    await run_steps(store, "opt", layout, live, 3)
    momentum = {name: torch.full_like(t, 0.5) for name, t in live.items()}
    ref = await store.snapshot("opt", 3, AdapterState(live, momentum))
    assert ref.version == 3
    state = await store.materialize("opt", 3, mezo_applier(layout))
    assert_theta_equal(state.optimizer_state, momentum)
    with pytest.raises(VersionNotFound):
        await store.snapshot("opt", 4, AdapterState(live))


async def test_corrupt_blob_is_integrity_error(store, tmp_path) -> None:
    layout = small_layout()
    await create(store, "bad", layout)
    (ref,) = await store.metadata.list_snapshots("bad")
    path = tmp_path / "data" / "blobs" / ref.blob_key
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError):
        await store.materialize("bad", 0, mezo_applier(layout))
    with pytest.raises(IntegrityError):
        await store.check("bad")
    path.unlink()
    with pytest.raises(IntegrityError):
        await store.materialize("bad", 0, mezo_applier(layout))


async def test_delete_adapter(store) -> None:
    await create(store, "gone", small_layout())
    await store.delete_adapter("gone")
    assert await store.list_adapters() == []
    with pytest.raises(AdapterNotFound):
        await store.get_adapter("gone")
    assert len(await store.collect_garbage()) == 1
    await store.create_adapter("gone", base_model="b", rank=4, alpha=8, target_modules=("q_proj",),
                               initial=initial(small_layout()))
