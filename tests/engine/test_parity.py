"""Engine path vs the transformers+PEFT baseline loop: same seeds, same data order, same trajectory."""

from __future__ import annotations

import pytest

from scheduler.baseline import BaselineConfig, BaselineMezoTrainer
from scheduler.datasets import load_sst2
from scheduler.engine.binding import EngineBinding
from scheduler.engine.config import EngineConfig
from scheduler.objectives import ClassificationObjective
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir
from scheduler.engine_step import run_engine_step
from scheduler.zo.methods import SgdHyper, build_method
from scheduler.zo.mezo import MezoHyper

NUM_STEPS = 30
# MeZO's LoRA setting uses ε = 1e-2; with ε = 1e-3 the ~1e-7 fp32 difference between the two forward
# implementations is amplified 500× into the finite difference.
HYPER = MezoHyper(lr=1e-3, eps=1e-2, num_directions=2)


async def _run_parity(binding: EngineBinding, model_dir: str, objective: ClassificationObjective) -> None:
    layout = layout_for_model_dir(model_dir, LoraShape(8, 16.0, ("q_proj", "v_proj")))
    theta0 = initial_state(layout, seed=7)
    data = objective.encode(binding.tokenizer, load_sst2("train", limit=400), 256)
    key = "parity"
    method = build_method("mezo-sgd", SgdHyper(HYPER.lr, HYPER.eps, HYPER.num_directions))
    await binding.set_state(key, layout, theta0, ("mezo-sgd", (("num_directions", HYPER.num_directions),)))
    baseline = BaselineMezoTrainer(BaselineConfig(model_dir), layout, theta0)
    slots = binding.slot_ids[:4]
    engine_grads, baseline_grads = [], []
    try:
        for step in range(NUM_STEPS):
            on_engine = await run_engine_step(
                binding, key, data, method, HYPER.lr, job_seed=11, step=step, batch_size=8, slots=slots, salt="parity"
            )
            on_baseline = baseline.step(data, HYPER, job_seed=11, step=step, batch_size=8)
            assert on_engine.batch == on_baseline.batch and on_engine.seeds == on_baseline.seeds
            engine_grads += on_engine.projected_grads
            baseline_grads += on_baseline.projected_grads
        engine_theta, _ = await binding.get_state(key)
    finally:
        await binding.drop_state(key)
    # Relative to each gradient, floored at the run's RMS gradient so that near-zero gradients do not
    # turn an absolute 1e-6 into an arbitrary ratio.
    rms = (sum(g * g for g in baseline_grads) / len(baseline_grads)) ** 0.5
    rel = [abs(e - b) / max(abs(b), rms) for e, b in zip(engine_grads, baseline_grads, strict=True)]
    assert rms > 1e-3, "the run must produce real gradients for the comparison to mean anything"
    assert max(rel) < 1e-3, f"projected gradients differ: max relative error {max(rel):.2e}"
    baseline_theta = baseline.state()
    moved = max((engine_theta[k] - theta0[k]).abs().max().item() for k in theta0)
    worst = max((engine_theta[k] - baseline_theta[k]).abs().max().item() for k in theta0)
    assert moved > 1e-3, "θ must move over the run"
    assert worst < 1e-4, f"final adapter tensors differ by {worst:.2e}"


async def test_parity_opt_multi_token_options(engine, opt_model_dir):
    objective = ClassificationObjective()  # the tiny tokenizer splits " terrible": a two-node option trie
    assert not objective.encode(engine.tokenizer, load_sst2("dev", limit=2), 256).single_token_options
    await _run_parity(engine, opt_model_dir, objective)


@pytest.fixture(scope="module")
async def llama_engine(llama_model_dir, tmp_path_factory):
    binding = await EngineBinding.start(EngineConfig(model=llama_model_dir, num_slots=6), tmp_path_factory.mktemp("llama"))
    yield binding
    binding.shutdown()


async def test_parity_llama_single_token_options(llama_engine, llama_model_dir):
    objective = ClassificationObjective(options=(" bad", " good"))  # one token each: last-position path
    assert objective.encode(llama_engine.tokenizer, load_sst2("dev", limit=2), 256).single_token_options
    await _run_parity(llama_engine, llama_model_dir, objective)
