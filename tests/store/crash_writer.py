"""The writer process of the crash test: resume from the head, then commit forever until killed.

A module of its own so a forkserver child can import it by name: the crash test must not fork the pytest
process itself, which may hold a live vLLM engine (threads, sockets, OpenMP pools) when the whole suite runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import torch
from store_helpers import mezo_applier, small_layout, step_record

from adapters_store import AdapterState, AdapterStore, open_store

NAME = "crashy"


def open_crash_store(store_url: str | None, data_dir: Path, key_prefix: str) -> AdapterStore:
    return open_store(store_url, data_dir, key_prefix=key_prefix, snapshot_every=3, keep_snapshots=2, gc_grace_s=0.0)


async def _write_forever(store_url: str | None, data_dir: Path, key_prefix: str) -> None:
    store = open_crash_store(store_url, data_dir, key_prefix)
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


def run_writer(store_url: str | None, data_dir: Path, key_prefix: str) -> None:
    torch.set_num_threads(1)
    asyncio.run(_write_forever(store_url, data_dir, key_prefix))
