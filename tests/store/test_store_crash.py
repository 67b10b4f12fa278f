"""Crash consistency: a writer killed with SIGKILL at random moments never leaves a mixed or dangling state.

A child process (crash_writer) resumes from the head, then commits MeZO steps forever (snapshots every 3
steps, retention and GC every 7, a rollback every 11) until the parent kills it. After each kill the parent
checks the invariants and materialises the head; now and then, and at the end, it also rebuilds the head
from the pinned initial snapshot alone, which proves every snapshot the child wrote agrees with the records
bit for bit.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import os
import random
import signal

import torch
from crash_writer import NAME, open_crash_store, run_writer
from store_helpers import assert_theta_equal, create, initial, mezo_applier, small_layout

from adapters_store.retention import ReplayPlan, plan_replay

NUM_KILLS = 50


def _writer_context():
    # forkserver: children fork from a clean server process (modules preloaded once, so a start costs a
    # few ms), never from pytest's process and whatever engine threads it holds.
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "adapters_store", "scheduler.zo.mezo", "store_helpers", "crash_writer"])
    return ctx


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
    store = open_crash_store(store_url, data_dir, key_prefix)
    await create(store, NAME, layout)
    await store.pin(NAME, 0)  # keeps the initial snapshot for the independent rebuild
    await store.close()

    ctx = _writer_context()
    rng = random.Random(0)
    previous_head = 0
    for kill in range(NUM_KILLS):
        child = ctx.Process(target=run_writer, args=(store_url, data_dir, key_prefix), daemon=True)
        child.start()
        await asyncio.sleep(rng.uniform(0.005, 0.12))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        assert child.exitcode == -signal.SIGKILL, "the writer died on its own: see its traceback above"

        store = open_crash_store(store_url, data_dir, key_prefix)
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
