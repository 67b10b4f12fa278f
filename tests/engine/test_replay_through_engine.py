"""Versions committed by the engine step loop materialise from the store exactly as the worker held them."""

from __future__ import annotations

import uuid

import pytest
import torch

from adapters_store import open_store
from scheduler.adapter_host import AdapterHost, SlotPool
from scheduler.datasets import load_sst2
from scheduler.engine_step import run_engine_step
from scheduler.objectives import ClassificationObjective
from scheduler.zo.lora_layout import LoraShape
from scheduler.zo.methods import build_method, hyper_items, parse_hyper

SHAPE = LoraShape(4, 8.0, ("q_proj", "v_proj"))


async def _train_and_check(
    engine, store, method_name: str, params: dict, num_steps: int, checkpoints: set[int], export_dir=None
) -> None:
    name = f"replay-{method_name}-{uuid.uuid4().hex[:6]}"
    slots = SlotPool(engine.slot_ids)
    host = AdapterHost(engine, store, slots)
    hyper = parse_hyper(method_name, {"lr": 1e-3, "eps": 1e-2, "num_directions": 1, **params})
    method = build_method(method_name, hyper)
    data = ClassificationObjective(options=(" bad", " good")).encode(engine.tokenizer, load_sst2("train", limit=64), 128)
    await host.create_if_missing(name, SHAPE, seed=5)
    probe_slots = await host.take_slots(2)
    adapter = await host.load(name, (method_name, hyper_items(hyper)))
    held: dict[int, tuple[dict, dict]] = {}
    try:
        for step in range(num_steps):
            outcome = await run_engine_step(
                engine, name, data, method, hyper.lr, job_seed=9, step=step, batch_size=2, slots=probe_slots, salt=f"r:{name}"
            )
            version = await host.commit_step(adapter, outcome, method, hyper)
            assert version == step + 1
            if version in checkpoints:
                held[version] = await engine.get_state(name)
        for version, (theta, buffers) in held.items():
            state = await host.materialize(name, version)
            assert state.theta.keys() == theta.keys()
            for key in theta:
                assert torch.equal(state.theta[key], theta[key]), f"θ differs at version {version}: {key}"
            for key in buffers:
                assert torch.equal(state.optimizer_state[key], buffers[key]), f"buffer differs at {version}: {key}"
        assert await store.resolve(name, "latest") == num_steps
        if export_dir is not None:  # the head exported from the store loads in vLLM like the engine's state
            sequences = data.sequences(range(6))
            await engine.write_state(name, probe_slots[0])
            in_engine = await engine.score(sequences, probe_slots[0], salt=f"export-check:{name}")
            exported = await host.export(name, "latest", export_dir)
            from_vllm = await engine.score_peft_dir(sequences, exported)
            worst = max(abs(a - b) for x, y in zip(in_engine, from_vllm) for a, b in zip(x.logprobs, y.logprobs))
            assert worst <= 1e-5, f"store export differs from the engine by {worst:.2e}"
    finally:
        await engine.drop_state(name)
        await slots.give_back(probe_slots)
        await store.delete_adapter(name)


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
async def test_200_mezo_steps_replay_bitwise(engine, redis_url, tmp_path, backend):
    url = redis_url if backend == "redis" else None
    store = open_store(url, tmp_path / "store", key_prefix=f"zoserve:test:{uuid.uuid4().hex[:8]}:", snapshot_every=50)
    try:
        await _train_and_check(engine, store, "mezo-sgd", {}, 200, {1, 37, 50, 51, 199, 200}, tmp_path / "export")
    finally:
        await store.close()


@pytest.mark.parametrize(
    "method_name, params",
    [("zo-adam", {}), ("zo-sgd-mmt", {"momentum": 0.9}), ("lozo-m", {"rank": 2, "basis_interval": 5}),
     ("lozo-bank", {"rank": 1, "basis_interval": 3}),  # R = 4: re-compressed at every window entry from step 12
     ("lozo-bank", {"rank": 1, "basis_interval": 3, "momentum": 0.9})],
)
async def test_stateful_methods_replay_bitwise(engine, tmp_path, method_name, params):
    store = open_store(None, tmp_path / "store", snapshot_every=10)
    try:
        await _train_and_check(engine, store, method_name, params, 24, {1, 9, 10, 11, 24})
    finally:
        await store.close()
