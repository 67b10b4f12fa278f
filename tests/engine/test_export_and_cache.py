"""Exported PEFT directories reproduce the in-engine log-probs; in-place slot writes never read stale KV."""

from __future__ import annotations

import torch

from scheduler.scoring import ScoringSequence
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir


def _random_state(model_dir: str, seed: int):
    layout = layout_for_model_dir(model_dir, LoraShape(8, 16.0, ("q_proj", "v_proj")))
    theta = initial_state(layout, seed)
    generator = torch.Generator().manual_seed(seed + 1)
    for spec in layout.tensors:
        if spec.kind == "B":
            theta[spec.name] = torch.randn(spec.shape, generator=generator) * 0.3
    return layout, theta


def _prompt(binding, text: str) -> tuple[int, ...]:
    return tuple(binding.tokenizer(text).input_ids)


async def test_exported_peft_dir_matches_engine_in_peft_and_vllm(engine, opt_model_dir, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    layout, theta = _random_state(opt_model_dir, seed=21)
    await engine.set_state("export", layout, theta)
    slot = engine.slot_ids[0]
    sequences = [
        ScoringSequence(_prompt(engine, "a gripping , funny and moving film"), target_start=1),
        ScoringSequence(_prompt(engine, "the plot is thin and the acting is worse"), target_start=1),
    ]
    try:
        await engine.write_state("export", slot)
        in_engine = await engine.score(sequences, slot, salt="export-test")
        exported = await engine.export_peft("export", tmp_path / "adapter")
    finally:
        await engine.drop_state("export")
    assert (exported / "adapter_config.json").exists() and (exported / "adapter_model.safetensors").exists()

    from_vllm = await engine.score_peft_dir(sequences, exported)
    base = AutoModelForCausalLM.from_pretrained(opt_model_dir, dtype=torch.float32)
    peft_model = PeftModel.from_pretrained(base, str(exported)).eval()
    worst_vllm = worst_peft = 0.0
    with torch.inference_mode():
        for seq, engine_scores, vllm_scores in zip(sequences, in_engine, from_vllm, strict=True):
            logits = peft_model(input_ids=torch.tensor([seq.token_ids])).logits[0]  # [L, V]
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            expected = [logprobs[i - 1, seq.token_ids[i]].item() for i in range(seq.target_start, len(seq.token_ids))]
            worst_peft = max(worst_peft, *(abs(a - b) for a, b in zip(engine_scores.logprobs, expected)))
            worst_vllm = max(worst_vllm, *(abs(a - b) for a, b in zip(engine_scores.logprobs, vllm_scores.logprobs)))
    assert worst_vllm <= 1e-5, f"vLLM load of the export differs by {worst_vllm:.2e}"
    assert worst_peft <= 1e-5, f"PEFT load of the export differs by {worst_peft:.2e}"


async def test_new_state_in_same_slot_never_reads_old_kv(engine, opt_model_dir, tmp_path):
    """A per-state cache salt isolates prefix-cache KV; reusing a salt after a rewrite would read stale KV."""
    layout, theta1 = _random_state(opt_model_dir, seed=31)
    _, theta2 = _random_state(opt_model_dir, seed=32)
    long_text = " ".join(["a gripping , funny and moving film about love and loss"] * 40)
    seq = ScoringSequence(_prompt(engine, long_text)[:400], candidate_ids=(642, 527))  # cached path
    slot = engine.slot_ids[1]
    try:
        await engine.set_state("kv", layout, theta1)
        await engine.write_state("kv", slot)
        (v1,) = await engine.score([seq], slot, salt="kv@1")
        await engine.set_state("kv", layout, theta2)
        await engine.write_state("kv", slot)
        (v2,) = await engine.score([seq], slot, salt="kv@2")
        (stale,) = await engine.score([seq], slot, salt="kv@1")  # the hazard the salt protects against
        exported = await engine.export_peft("kv", tmp_path / "kv2")
    finally:
        await engine.drop_state("kv")
    (fresh,) = await engine.score_peft_dir([seq], exported)
    assert max(abs(a - b) for a, b in zip(v2.logprobs, fresh.logprobs)) <= 1e-5
    assert max(abs(a - b) for a, b in zip(v1.logprobs, v2.logprobs)) > 1e-3
    # Under the old salt the engine reuses θ1's cached prefix blocks with θ2 weights: a wrong mixture.
    assert max(abs(a - b) for a, b in zip(stale.logprobs, fresh.logprobs)) > 1e-4, "salt did not matter?"
