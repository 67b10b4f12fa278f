"""Crash consistency: a writer killed with SIGKILL at random moments never leaves a mixed or dangling state.

A forked child resumes from the head, then commits MeZO steps forever (snapshots every 3 steps, retention
and GC every 7, a rollback every 11) until the parent kills it. After each kill the parent checks the
invariants and materialises the head; now and then, and at the end, it also rebuilds the head from the
pinned initial snapshot alone, which proves every snapshot the child wrote agrees with the records bit for bit.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal
from pathlib import Path

import torch
from store_helpers import assert_theta_equal, create, initial, mezo_applier, small_layout, step_record

from adapters_store import AdapterState, open_store
from adapters_store.retention import ReplayPlan, plan_replay

NUM_KILLS = 50
NAME = "crashy"


def _open(store_url: str | None, data_dir: Path, key_prefix: str):
    return open_store(store_url, data_dir, key_prefix=key_prefix, snapshot_every=3, keep_snapshots=2, gc_grace_s=0.0)


async def _writer(store_url: str | None, data_dir: Path, key_prefix: str) -> None:
    store = _open(store_url, data_dir, key_prefix)
    layout = small_layout()
    apply = mezo_applier(layout)
    head = (await store.get_adapter(NAME)).head
    live = (await store.materialize(NAME, head, apply)).theta
    while True:
        if head % 11 == 10:
            commit = await store.rollback(NAME, head - 2, apply, expected_head=head)
            live = (await store.materialize(NAME, commit.record.version, apply)).theta
        else:
            record = step_record(step=head + 1, parent=head)
            apply(live, {}, record)
            state = AdapterState({k: v.clone() for k, v in live.items()}) if store.snapshot_due(head + 1) else None
            await store.commit(NAME, record, state)
        head += 1
        if head % 7 == 0:
            await store.apply_retention(NAME)
            await store.collect_garbage()  # single writer: no commit of ours is in flight


def _child(store_url: str | None, data_dir: Path, key_prefix: str) -> None:
    torch.set_num_threads(1)  # forked from a process that may own an OpenMP pool
    asyncio.run(_writer(store_url, data_dir, key_prefix))


async def _rebuild_from_initial(store, apply) -> dict[str, torch.Tensor]:
    head = (await store.get_adapter(NAME)).head
    records = {r.version: r for r in await store.metadata.get_records(NAME, 1, head)}
    plan = plan_replay(head, {0}, records)
    assert isinstance(plan, ReplayPlan)
    theta = initial(small_layout()).theta
    for record in plan.updates:
        apply(theta, {}, record)
    return theta


async def test_sigkill_during_commits_keeps_store_consistent(store_url, tmp_path, key_prefix) -> None:
    data_dir = tmp_path / "data"
    layout = small_layout()
    apply = mezo_applier(layout)
    store = _open(store_url, data_dir, key_prefix)
    await create(store, NAME, layout)
    await store.pin(NAME, 0)  # keeps the initial snapshot for the independent rebuild
    await store.close()

    ctx = multiprocessing.get_context("fork")
    rng = random.Random(0)
    previous_head = 0
    for kill in range(NUM_KILLS):
        # No store (SQLite connection, Redis sockets) is open across the fork.
        child = ctx.Process(target=_child, args=(store_url, data_dir, key_prefix), daemon=True)
        child.start()
        await asyncio.sleep(rng.uniform(0.005, 0.12))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, "the writer died on its own: see its traceback above"

        store = _open(store_url, data_dir, key_prefix)
        try:
            head = (await store.get_adapter(NAME)).head
            assert head >= previous_head
            await store.check(NAME)  # head record exists, records chain, every blob exists and hashes right
            state = await store.materialize(NAME, head, apply)
            if kill % 10 == 9 or kill == NUM_KILLS - 1:
                assert_theta_equal(state.theta, await _rebuild_from_initial(store, apply))
            previous_head = head
        finally:
            await store.close()
    assert previous_head > NUM_KILLS  # the writers made real progress between kills
