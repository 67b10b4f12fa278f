"""Block scales and a sparse mask carried to the worker: the engine's probe slots hold exactly the pure
formula's masked, scaled probes, and the committed versions replay bitwise from the store alone."""

from __future__ import annotations

import uuid

import torch

from adapters_store import AdapterState, open_store
from adapters_store.peft_format import PeftAdapterConfig, write_peft_dir
from scheduler.adapter_host import AdapterHost, SlotPool
from scheduler.datasets import load_sst2
from scheduler.direction_artifacts import artifact_hparam, artifact_id, encode_artifacts
from scheduler.engine_step import run_engine_step
from scheduler.objectives import ClassificationObjective
from scheduler.zo.block_scales import normalise_scales
from scheduler.zo.lora_layout import LoraShape, initial_state
from scheduler.zo.methods import build_method, hyper_items, parse_hyper
from scheduler.zo.sparse_mask import topk_mask
from scheduler.zo.zo_step import materialise_probes, next_probes, probes_to_wire

SHAPE = LoraShape(4, 8.0, ("q_proj", "v_proj"))


def _worst(a, b) -> float:
    return max(abs(x - y) for s, t in zip(a, b, strict=True) for x, y in zip(s.logprobs, t.logprobs, strict=True))


async def test_masked_scaled_probes_match_the_formula_and_replay_bitwise(engine, tmp_path):
    store = open_store(None, tmp_path / "store", snapshot_every=3)
    name = f"artifacts-{uuid.uuid4().hex[:6]}"
    host = AdapterHost(engine, store, SlotPool(engine.slot_ids))
    layout = await host.layout(SHAPE)
    gen = torch.Generator().manual_seed(0)
    # Start with B ≠ 0 so that A's perturbation shows in the log-probs too.
    theta0 = {k: v + 0.3 * torch.randn(v.shape, generator=gen) if "lora_B" in k else v
              for k, v in initial_state(layout, 5).items()}
    await store.create_adapter(
        name, base_model=engine.config.model, rank=SHAPE.rank, alpha=SHAPE.alpha, target_modules=SHAPE.target_modules,
        initial=AdapterState(theta0, {}),
    )
    mask = topk_mask({s.name: torch.rand(s.shape, generator=gen) for s in layout.tensors}, layout, 0.25)
    scales = normalise_scales({s.name: 0.25 + i for i, s in enumerate(layout.tensors)}, layout)
    blob = encode_artifacts(layout, scales, mask)
    hyper = parse_hyper("mezo-sgd", {"lr": 5e-2, "eps": 5e-2, "num_directions": 1})
    method = build_method("mezo-sgd", hyper, block_scales=scales, mask=mask)
    plain = build_method("mezo-sgd", hyper)
    data = ClassificationObjective(options=(" bad", " good")).encode(engine.tokenizer, load_sst2("train", limit=32), 128)
    sequences = data.sequences(range(4))
    probe_slots = await host.take_slots(2)
    adapter = await host.load(name, ("mezo-sgd", hyper_items(hyper), blob))
    try:
        assert all(torch.equal(v, theta0[k]) for k, v in (await engine.get_state(name))[0].items())
        seeds = method.perturbation.seeds_for_step(9, 0, 1)
        probes = next_probes(method, seeds, (), hyper.lr)
        await engine.write_probes(name, 0, seeds.as_tuple(), probes_to_wire(probes), list(probe_slots))
        expected = materialise_probes(theta0, layout, method.perturbation, seeds, probes)
        unmasked = materialise_probes(theta0, layout, plain.perturbation, seeds, probes)
        config = PeftAdapterConfig(SHAPE.rank, SHAPE.alpha, SHAPE.target_modules)
        for j, slot in enumerate(probe_slots):
            in_slot = await engine.score(sequences, slot, salt=f"artifacts-test:{name}:{j}")
            formula = await engine.score_peft_dir(sequences, write_peft_dir(expected[j], config, tmp_path / f"p{j}"))
            other = await engine.score_peft_dir(sequences, write_peft_dir(unmasked[j], config, tmp_path / f"u{j}"))
            assert _worst(in_slot, formula) <= 1e-5, f"probe {j}: slot differs from the masked, scaled formula"
            assert _worst(in_slot, other) > 1e-3, f"probe {j}: the slot looks like an unmasked probe"

        held = {}
        for step in range(6):
            outcome = await run_engine_step(
                engine, name, data, method, hyper.lr, job_seed=9, step=step, batch_size=4, slots=probe_slots,
                salt=f"a:{name}",
            )
            version = await host.commit_step(adapter, outcome, method, hyper)
            held[version] = (await engine.get_state(name))[0]
        record = await store.get_record(name, 4)
        assert artifact_hparam(artifact_id(blob)) in record.hparams
        for k in theta0:  # only masked coordinates moved
            assert torch.equal(held[6][k][~mask[k]], theta0[k][~mask[k]]), k
        assert any(not torch.equal(held[6][k], theta0[k]) for k in theta0)

        # A fresh host (no artifacts in memory) rebuilds every version from the store, after GC.
        store.gc_grace_s = 0.0
        await store.collect_garbage()
        fresh = AdapterHost(engine, store, SlotPool(()))
        for version, theta in held.items():
            state = await fresh.materialize(name, version)
            for k in theta:
                assert torch.equal(state.theta[k], theta[k]), f"θ differs at version {version}: {k}"
    finally:
        await engine.drop_state(name)
        await host.slots.give_back(probe_slots)
        await store.delete_adapter(name)
        await store.close()
