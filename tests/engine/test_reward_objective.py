"""The reward objective through the engine: each probe's loss is 1 − the fraction of greedy generations that
match, the step path feeds it to `finish_step` like any loss, the committed versions replay bitwise, and the
transformers+PEFT baseline generates the same text and takes the same steps."""

from __future__ import annotations

import uuid

import pytest
import torch

from adapters_store import open_store
from scheduler.adapter_host import AdapterHost, SlotPool
from scheduler.baseline import BaselineConfig, BaselineMezoTrainer, BaselineZoTrainer, PeftLora
from scheduler.datasets import load_sst2
from scheduler.engine.binding import PROBE_PRIORITY
from scheduler.engine_step import run_engine_step
from scheduler.objectives import PromptCompletion
from scheduler.probe_eval import greedy_generations
from scheduler.rewards import RewardObjective, reward, words
from scheduler.sampling import batch_indices
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir
from scheduler.zo.methods import build_method, hyper_items, parse_hyper
from scheduler.zo.mezo import MezoHyper
from scheduler.zo.zo_step import next_probes, probes_to_wire

SHAPE = LoraShape(4, 8.0, ("q_proj", "v_proj"))
MAX_NEW_TOKENS = 4


async def _generate(engine, prompt_ids, slot, salt) -> str:
    text = ""
    async for chunk in engine.generate(
        prompt_ids, max_tokens=MAX_NEW_TOKENS, temperature=0.0, top_p=1.0, seed=None, stop=None, slot=slot,
        salt=salt, priority=PROBE_PRIORITY,
    ):
        text = chunk.text
    return text


async def _examples(engine, num: int, whole: bool = False) -> list[PromptCompletion]:
    """SST-2 prompts whose references make about half of them match the base model's own greedy answer
    (its last word, or with `whole` all its words)."""
    prompts = [ex.text for ex in load_sst2("train", limit=num)]
    objective = RewardObjective(template="{prompt} It was", max_new_tokens=MAX_NEW_TOKENS)
    probe = objective.encode(engine.tokenizer, [PromptCompletion(p, "x") for p in prompts], 128)
    examples = []
    for i, prompt in enumerate(prompts):
        said = words(await _generate(engine, probe.prompts[i], None, "reward-test:base"))
        hit = " ".join(said) if whole else (said[-1] if said else "")
        reference = hit if hit and i % 2 == 0 else "zqxjv"  # the base model's own answer, or a miss
        examples.append(PromptCompletion(prompt, reference))
    return examples


async def test_probe_losses_are_one_minus_match_rate_and_versions_replay(engine, tmp_path):
    store = open_store(None, tmp_path / "store", snapshot_every=2)
    name = f"reward-{uuid.uuid4().hex[:6]}"
    slots = SlotPool(engine.slot_ids)
    host = AdapterHost(engine, store, slots)
    objective = RewardObjective(template="{prompt} It was", match="contains", max_new_tokens=MAX_NEW_TOKENS)
    examples = await _examples(engine, 16)
    data = objective.encode(engine.tokenizer, examples, 128)
    hyper = parse_hyper("mezo-sgd", {"lr": 1e-2, "eps": 5e-2, "num_directions": 2})
    method = build_method("mezo-sgd", hyper)
    await host.create_if_missing(name, SHAPE, seed=3)
    probe_slots = await host.take_slots(4)
    adapter = await host.load(name, ("mezo-sgd", hyper_items(hyper)))
    try:
        # Independently: write step 0's probes, generate under each slot, match by hand.
        seeds = method.perturbation.seeds_for_step(11, 0, method.num_directions)
        probes = next_probes(method, seeds, (), hyper.lr)
        await engine.write_probes(name, 0, seeds.as_tuple(), probes_to_wire(probes), list(probe_slots))
        batch = batch_indices(11, 0, 8, len(data))
        expected = []
        for j, slot in enumerate(probe_slots):
            texts = [await _generate(engine, data.prompts[i], slot, f"reward-test:{name}:{j}") for i in batch]
            matched = [reward(t, (examples[i].completion,), "contains") for t, i in zip(texts, batch)]
            expected.append(1.0 - sum(matched) / len(matched))
        assert min(expected) < 1.0, "no generation matched: the test would not tell rewards apart"

        held = {}
        for step in range(4):
            outcome = await run_engine_step(
                engine, name, data, method, hyper.lr, job_seed=11, step=step, batch_size=8, slots=probe_slots,
                salt=f"r:{name}",
            )
            if step == 0:
                assert outcome.losses == tuple(expected)
                assert outcome.num_sequences == 4 * 8
            assert all(0.0 <= loss <= 1.0 for loss in outcome.losses)
            version = await host.commit_step(adapter, outcome, method, hyper)
            assert version == step + 1
            held[version] = (await engine.get_state(name))[0]
        for version, theta in held.items():
            state = await host.materialize(name, version)
            for key in theta:
                assert torch.equal(state.theta[key], theta[key]), f"θ differs at version {version}: {key}"
        initial = (await host.materialize(name, 0)).theta
        assert any(not torch.equal(initial[k], held[4][k]) for k in initial), "four steps left θ unchanged"
    finally:
        await engine.drop_state(name)
        await slots.give_back(probe_slots)
        await store.delete_adapter(name)
        await store.close()


@pytest.mark.parametrize("match", ["exact", "contains"])
async def test_exact_rule_through_the_engine_matches_the_pure_rule(engine, match):
    """Under the base model (slot None) the engine's reward batch equals the pure rule over generate()."""
    from scheduler.probe_eval import probe_batch_score

    examples = await _examples(engine, 6, whole=match == "exact")
    data = RewardObjective(template="{prompt} It was", match=match, max_new_tokens=MAX_NEW_TOKENS).encode(
        engine.tokenizer, examples, 128
    )
    indices = list(range(6))
    score = await probe_batch_score(engine, data, indices, data.sequences(indices), None, salt="reward-test:exact")
    texts = [await _generate(engine, data.prompts[i], None, "reward-test:exact-ref") for i in indices]
    rewards = [reward(t, (examples[i].completion,), match) for t, i in zip(texts, indices)]
    assert score.num_correct == int(sum(rewards)) and score.loss == 1.0 - sum(rewards) / len(rewards)
    assert 0 < score.num_correct < len(indices)  # the odd rows cannot match, the even ones do


# ------------------------------------------------------------------------------------ baseline parity
PARITY_SHAPE = LoraShape(8, 16.0, ("q_proj", "v_proj"))


def _theta_rel(a: dict, b: dict) -> float:
    """‖a − b‖ / ‖b‖ over every tensor of the adapter."""
    num = sum(float(((a[k] - b[k]) ** 2).sum()) for k in b) ** 0.5
    return num / sum(float((b[k] ** 2).sum()) for k in b) ** 0.5


async def test_baseline_generates_the_engines_text(engine, opt_model_dir):
    """Greedy text under θ0 (B = 0: the base model) from transformers equals vLLM's, with and without stop
    strings: the detokenization and stop rules the reward parity below relies on."""
    prompts = [ex.text for ex in load_sst2("train", limit=12)]
    plain = RewardObjective(template="{prompt} It was", max_new_tokens=MAX_NEW_TOKENS)
    data = plain.encode(engine.tokenizer, [PromptCompletion(p, "x") for p in prompts], 128)
    indices = list(range(len(data)))
    layout = layout_for_model_dir(opt_model_dir, PARITY_SHAPE)
    lora = PeftLora(BaselineConfig(opt_model_dir), layout, initial_state(layout, seed=7))
    texts = [await _generate(engine, data.prompts[i], None, "reward-test:text") for i in indices]
    assert lora.generate(data, indices) == texts
    # Stop strings taken from the middle of three generations, so that they cut some texts short.
    stop = tuple(dict.fromkeys(t[len(t) // 2 : len(t) // 2 + 2] for t in texts[:3] if len(t) >= 2))
    cut = RewardObjective(template="{prompt} It was", max_new_tokens=MAX_NEW_TOKENS, stop=stop)
    cut_data = cut.encode(engine.tokenizer, [PromptCompletion(p, "x") for p in prompts], 128)
    cut_texts = await greedy_generations(engine, cut_data, indices, None, "reward-test:cut")
    assert cut_texts != texts, "the stop strings cut nothing: the check would not see the stop rule"
    assert lora.generate(cut_data, indices) == cut_texts


async def test_reward_steps_match_the_baseline(engine, opt_model_dir):
    """MeZO on the reward objective, engine vs transformers+PEFT from the same θ0, seeds and minibatches.

    Rewards are discrete and both sides generate the same greedy tokens, so every probe loss must be equal
    exactly; θ then follows the same update arithmetic (`apply_record` on both sides) from equal scalars.
    """
    objective = RewardObjective(template="{prompt} It was", match="contains", max_new_tokens=MAX_NEW_TOKENS)
    data = objective.encode(engine.tokenizer, await _examples(engine, 16), 128)
    hyper = parse_hyper("mezo-sgd", {"lr": 1e-2, "eps": 5e-2, "num_directions": 2})
    method = build_method("mezo-sgd", hyper)
    layout = layout_for_model_dir(opt_model_dir, PARITY_SHAPE)
    theta0 = initial_state(layout, seed=7)
    protocol = BaselineZoTrainer(BaselineConfig(opt_model_dir), layout, theta0, method)
    in_place = BaselineMezoTrainer(BaselineConfig(opt_model_dir), layout, theta0)  # MeZO's own perturb/restore
    mezo_hyper = MezoHyper(lr=hyper.lr, eps=hyper.eps, num_directions=hyper.num_directions)
    key = f"reward-parity-{uuid.uuid4().hex[:6]}"
    await engine.set_state(key, layout, theta0, ("mezo-sgd", hyper_items(hyper)))
    engine_losses, grads = [], []
    try:
        for step in range(5):
            on_engine = await run_engine_step(
                engine, key, data, method, hyper.lr, job_seed=11, step=step, batch_size=8,
                slots=engine.slot_ids[:4], salt=key,
            )
            on_protocol = protocol.step(data, hyper.lr, job_seed=11, step=step, batch_size=8)
            on_in_place = in_place.step(data, mezo_hyper, job_seed=11, step=step, batch_size=8)
            assert on_engine.batch == on_protocol.batch == on_in_place.batch
            assert on_engine.seeds == on_protocol.seeds
            assert on_engine.losses == on_protocol.losses, f"step {step}: probe losses differ"
            assert on_engine.losses == on_in_place.losses, f"step {step}: probe losses differ (in-place MeZO)"
            engine_losses += on_engine.losses
            grads += on_engine.projected_grads
        engine_theta, _ = await engine.get_state(key)
    finally:
        await engine.drop_state(key)
    # Not vacuous: some probe losses lie strictly between 0 and 1 and some ± pair disagrees (θ moves).
    assert any(0.0 < loss < 1.0 for loss in engine_losses), engine_losses
    assert any(g != 0.0 for g in grads), "every ± pair scored alike: θ never moved"
    moved = max((engine_theta[k] - theta0[k]).abs().max().item() for k in theta0)
    assert moved > 1e-3, "θ must move over the run"
    protocol_rel = _theta_rel(engine_theta, protocol.state()[0])
    in_place_rel = _theta_rel(engine_theta, in_place.state())
    assert protocol_rel < 1e-5 and in_place_rel < 1e-5, (protocol_rel, in_place_rel)
    print(f"reward parity: losses equal over {len(engine_losses)} probes, θ rel {protocol_rel:.2e} "
          f"(in-place MeZO {in_place_rel:.2e}), moved {moved:.3g}")
