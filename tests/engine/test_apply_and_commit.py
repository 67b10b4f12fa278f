"""A job's step after scoring: the update, the store commit and the serving buffer, on the real engine.

`AdapterHost.apply_and_commit` writes the stepped state into the idle serving buffer in the same engine call
gap as the update. What must hold: the version served is the one committed, its slot holds exactly the
worker's state, and a buffer some request is still reading is never written.
"""

from __future__ import annotations

import uuid

from adapters_store import open_store
from scheduler.adapter_host import AdapterHost, SlotPool
from scheduler.datasets import load_sst2
from scheduler.engine_step import score_engine_step
from scheduler.objectives import ClassificationObjective
from scheduler.zo.lora_layout import LoraShape
from scheduler.zo.methods import build_method, hyper_items, parse_hyper

SHAPE = LoraShape(4, 8.0, ("q_proj", "v_proj"))


async def test_each_step_is_served_once_committed_and_never_into_a_buffer_in_use(engine, tmp_path):
    store = open_store(None, tmp_path / "store")
    name = f"apply-{uuid.uuid4().hex[:6]}"
    slots = SlotPool(engine.slot_ids)
    host = AdapterHost(engine, store, slots)
    hyper = parse_hyper("mezo-sgd", {"lr": 5e-2, "eps": 1e-2, "num_directions": 1})
    method = build_method("mezo-sgd", hyper)
    data = ClassificationObjective(options=(" bad", " good")).encode(engine.tokenizer, load_sst2("train", limit=64), 128)
    probe = data.sequences(range(4))
    await host.create_if_missing(name, SHAPE, seed=3)
    probe_slots = await host.take_slots(2)
    adapter = await host.load(name, ("mezo-sgd", hyper_items(hyper)))
    salts = iter(range(1000))

    async def scores_in(slot: int) -> list[tuple[float, ...]]:
        return [s.logprobs for s in await engine.score(probe, slot, salt=f"check:{name}:{next(salts)}")]

    async def worker_scores() -> list[tuple[float, ...]]:  # the worker's master state, through a probe slot
        await engine.write_state(name, probe_slots[0])
        return await scores_in(probe_slots[0])

    async def step() -> int:
        outcome = await score_engine_step(
            engine, name, data, method, hyper.lr, job_seed=4, step=adapter.head, batch_size=4, slots=probe_slots,
            salt=f"probe:{name}@{adapter.head}",
        )
        return await host.apply_and_commit(adapter, outcome, method, hyper)

    def live_slot() -> int:
        lease = host.serving.acquire(name)
        host.serving.release(lease)
        return lease.slot

    try:
        assert await step() == 1
        assert host.serving.live_version(name) == 1 == await store.resolve(name, "latest")
        v1_slot, v1_scores = live_slot(), await worker_scores()
        assert await scores_in(v1_slot) == v1_scores

        async with host.lease(name) as reading:  # a user request still reading version 1
            assert (reading.slot, reading.version) == (v1_slot, 1)
            assert await step() == 2  # into the other buffer, which nobody reads
            assert host.serving.live_version(name) == 2 and live_slot() != v1_slot
            assert await scores_in(live_slot()) == await worker_scores() != v1_scores
            assert await step() == 3  # the idle buffer is the one being read: not written, version 2 stays live
            assert host.serving.live_version(name) == 2
            assert await scores_in(v1_slot) == v1_scores
        assert await step() == 4
        assert host.serving.live_version(name) == 4 == await store.resolve(name, "latest")
        assert live_slot() == v1_slot
        assert await scores_in(v1_slot) == await worker_scores()
    finally:
        await engine.drop_state(name)
        await slots.give_back(probe_slots)
        await store.close()
