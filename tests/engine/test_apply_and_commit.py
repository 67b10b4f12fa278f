"""A job's step after scoring: the update, the store commit and the serving buffer, on the real engine.

`AdapterHost.apply_and_commit` writes the stepped state into the idle serving buffer in the same engine call
gap as the update. What must hold: the version served is the one committed, its slot holds exactly the
worker's state, a buffer some request is still reading is never written, and an update that reached the
worker is committed even when the buffer write fails.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import pytest
import torch

from adapters_store import open_store
from scheduler.adapter_host import AdapterHost, LoadedAdapter, SlotPool
from scheduler.datasets import load_sst2
from scheduler.engine_step import run_engine_step
from scheduler.objectives import ClassificationObjective
from scheduler.zo.lora_layout import LoraShape
from scheduler.zo.methods import build_method, hyper_items, parse_hyper

SHAPE = LoraShape(4, 8.0, ("q_proj", "v_proj"))


@dataclass
class Training:
    engine: object
    store: object
    host: AdapterHost
    adapter: LoadedAdapter
    probe_slots: tuple[int, ...]
    method: object
    hyper: object
    data: object
    salts = iter(range(10**6))

    @property
    def name(self) -> str:
        return self.adapter.name

    async def step(self) -> int:
        outcome = await run_engine_step(
            self.engine, self.name, self.data, self.method, self.hyper.lr, job_seed=4, step=self.adapter.head,
            batch_size=4, slots=self.probe_slots, salt=f"probe:{self.name}@{self.adapter.head}", apply=False,
        )
        return await self.host.apply_and_commit(self.adapter, outcome, self.method, self.hyper)

    async def scores_in(self, slot: int) -> list[tuple[float, ...]]:
        probe = self.data.sequences(range(4))
        return [s.logprobs for s in await self.engine.score(probe, slot, salt=f"check:{self.name}:{next(self.salts)}")]

    async def worker_scores(self) -> list[tuple[float, ...]]:  # the worker's master state, through a probe slot
        await self.engine.write_state(self.name, self.probe_slots[0])
        return await self.scores_in(self.probe_slots[0])

    def live_slot(self) -> int:
        lease = self.host.serving.acquire(self.name)
        self.host.serving.release(lease)
        return lease.slot


@asynccontextmanager
async def training(engine, tmp_path) -> AsyncIterator[Training]:
    store = open_store(None, tmp_path / "store")
    name = f"apply-{uuid.uuid4().hex[:6]}"
    slots = SlotPool(engine.slot_ids)
    host = AdapterHost(engine, store, slots)
    hyper = parse_hyper("mezo-sgd", {"lr": 5e-2, "eps": 1e-2, "num_directions": 1})
    data = ClassificationObjective(options=(" bad", " good")).encode(engine.tokenizer, load_sst2("train", limit=64), 128)
    await host.create_if_missing(name, SHAPE, seed=3)
    probe_slots = await host.take_slots(2)
    adapter = await host.load(name, ("mezo-sgd", hyper_items(hyper)))
    try:
        yield Training(engine, store, host, adapter, probe_slots, build_method("mezo-sgd", hyper), hyper, data)
    finally:
        await engine.drop_state(name)
        await slots.give_back(probe_slots)
        await store.close()


async def test_each_step_is_served_once_committed_and_never_into_a_buffer_in_use(engine, tmp_path):
    async with training(engine, tmp_path) as t:
        assert await t.step() == 1
        assert t.host.serving.live_version(t.name) == 1 == await t.store.resolve(t.name, "latest")
        v1_slot, v1_scores = t.live_slot(), await t.worker_scores()
        assert await t.scores_in(v1_slot) == v1_scores

        async with t.host.lease(t.name) as reading:  # a user request still reading version 1
            assert (reading.slot, reading.version) == (v1_slot, 1)
            assert await t.step() == 2  # into the other buffer, which nobody reads
            assert t.host.serving.live_version(t.name) == 2 and t.live_slot() != v1_slot
            assert await t.scores_in(t.live_slot()) == await t.worker_scores() != v1_scores
            assert await t.step() == 3  # the idle buffer is the one being read: not written, version 2 stays live
            assert t.host.serving.live_version(t.name) == 2
            assert await t.scores_in(v1_slot) == v1_scores
        assert await t.step() == 4
        assert t.host.serving.live_version(t.name) == 4 == await t.store.resolve(t.name, "latest")
        assert t.live_slot() == v1_slot
        assert await t.scores_in(v1_slot) == await t.worker_scores()


async def test_an_update_is_committed_even_when_the_buffer_write_fails(engine, tmp_path, monkeypatch):
    async with training(engine, tmp_path) as t:
        assert await t.step() == 1

        async def failing_write(key: str, slot: int) -> None:
            raise RuntimeError("serving buffer write failed")

        with monkeypatch.context() as patch:
            patch.setattr(engine, "write_state", failing_write)
            with pytest.raises(RuntimeError, match="serving buffer write failed"):
                await t.step()
        assert await t.store.resolve(t.name, "latest") == 2 == t.adapter.head  # the update reached the store
        assert t.host.serving.live_version(t.name) == 1  # and nothing half-written is served
        committed = await t.host.materialize(t.name, 2)
        held, _ = await engine.get_state(t.name)
        assert all(torch.equal(committed.theta[k], held[k]) for k in held)
        assert await t.step() == 3
        assert t.host.serving.live_version(t.name) == 3


async def test_a_call_sent_once_start_commit_returns_sees_the_update(engine, tmp_path):
    """What lets a job score its next step while this one is committed: once `start_commit` returns, the
    update is on its way, so the engine runs it before any call sent after, even one this task awaits at
    once, ahead of the commit's own tasks."""
    async with training(engine, tmp_path) as t:
        assert await t.step() == 1
        before = await t.worker_scores()
        outcome = await run_engine_step(
            t.engine, t.name, t.data, t.method, t.hyper.lr, job_seed=4, step=1, batch_size=4,
            slots=t.probe_slots, salt=f"probe:{t.name}:next", apply=False,
        )
        pending = await t.host.start_commit(t.adapter, outcome, t.method, t.hyper)
        await engine.write_state(t.name, t.probe_slots[1])  # sent before the commit's tasks run any further
        early = await t.scores_in(t.probe_slots[1])
        assert await pending.task is True
        assert t.adapter.head == 2 == t.host.serving.live_version(t.name)
        assert early == await t.worker_scores() != before
