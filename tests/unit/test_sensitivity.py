"""The sensitivity mask comes from real backprop of the LM loss (transformers + PEFT on CPU)."""

from __future__ import annotations

import math

import torch

from scheduler.baseline import BaselineConfig, PeftLora
from scheduler.datasets import load_sst2
from scheduler.scoring import ScoringSequence
from scheduler.sensitivity import lm_loss_gradients, sensitivity_mask
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir

SHAPE = LoraShape(4, 8.0, ("q_proj", "v_proj"))


def _warm_theta(layout):
    gen = torch.Generator().manual_seed(3)
    return {k: v + 0.1 * torch.randn(v.shape, generator=gen) if "lora_B" in k else v
            for k, v in initial_state(layout, 1).items()}


def test_gradients_are_those_of_the_transformers_lm_loss(opt_model_dir):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    layout = layout_for_model_dir(opt_model_dir, SHAPE)
    theta = _warm_theta(layout)
    lora = PeftLora(BaselineConfig(opt_model_dir), layout, theta)
    ids = tuple(lora.tokenizer("a gripping , funny and moving film").input_ids)
    ours = lm_loss_gradients(lora, [ScoringSequence(ids, target_start=1)])

    # Independently: PEFT model, labels = inputs (transformers shifts them), loss.backward().
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(opt_model_dir, dtype=torch.float32),
        LoraConfig(r=SHAPE.rank, lora_alpha=SHAPE.alpha, target_modules=list(SHAPE.target_modules), lora_dropout=0.0),
    )
    named = dict(model.named_parameters())
    for spec in layout.tensors:
        live = spec.name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        named[live].data.copy_(theta[spec.name])
    batch = torch.tensor([ids])
    model(input_ids=batch, labels=batch).loss.backward()
    for spec in layout.tensors:
        live = spec.name.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        reference = named[live].grad
        assert torch.allclose(ours[spec.name], reference, rtol=1e-4, atol=1e-7), spec.name
    assert any(float(g.abs().max()) > 0 for k, g in ours.items() if "lora_A" in k)  # B ≠ 0: A is sensitive too


def test_mask_keeps_the_top_fraction_deterministically(opt_model_dir):
    layout = layout_for_model_dir(opt_model_dir, SHAPE)
    texts = [ex.text for ex in load_sst2("train", limit=24)]
    theta = _warm_theta(layout)
    mask = sensitivity_mask(opt_model_dir, layout, theta, texts, 0.1, num_batches=3, batch_size=4)
    assert sum(int(m.sum()) for m in mask.values()) == math.ceil(0.1 * layout.num_params)
    again = sensitivity_mask(opt_model_dir, layout, theta, texts, 0.1, num_batches=3, batch_size=4)
    assert all(torch.equal(mask[k], again[k]) for k in mask)
    # At a fresh state (B = 0) ∂L/∂A = 0: a small mask holds B coordinates only.
    fresh = sensitivity_mask(opt_model_dir, layout, initial_state(layout, 1), texts, 0.05, num_batches=2, batch_size=4)
    assert not any(bool(m.any()) for k, m in fresh.items() if "lora_A" in k)
    assert any(bool(m.any()) for k, m in fresh.items() if "lora_B" in k)
