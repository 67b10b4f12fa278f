"""A SensZOQ-style sparse mask from real backprop: squared gradients of the LM loss on unlabelled text.

Runs once per job, before ZO starts, on CPU with transformers + PEFT (`baseline.PeftLora`): for each of a few
batches of text the gradient of the mean next-token loss w.r.t. the adapter tensors at θ, squared and summed
(`sparse_mask.sensitivity_scores`, a diagonal Fisher estimate), then the global top fraction
(`sparse_mask.topk_mask`). The mask is a pure function of (model, θ, texts, batch sizes, fraction).

At a fresh LoRA state (B = 0) ∂L/∂A is exactly 0, so every A coordinate scores 0 and the mask keeps B
coordinates first; that is the true sensitivity there, and a reason to compute masks from a warm θ.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from scheduler.baseline import BaselineConfig, PeftLora
from scheduler.objectives import _truncate_left
from scheduler.scoring import ScoringSequence
from scheduler.zo.lora_layout import LoraLayout
from scheduler.zo.sparse_mask import sensitivity_scores, topk_mask


def lm_loss_gradients(lora: PeftLora, sequences: Sequence[ScoringSequence]) -> dict[str, torch.Tensor]:
    """∂(mean next-token NLL over `sequences`)/∂θ as a θ-shaped dict."""
    params = [lora.params[spec.name] for spec in lora.layout.tensors]
    for param in params:
        param.requires_grad_(True)
    try:
        logprobs = lora.position_logprobs(sequences)  # [P, V]
        targets = torch.tensor([t for seq in sequences for t in seq.token_ids[seq.target_start :]])  # [P]
        loss = -logprobs[torch.arange(len(targets)), targets].mean()
        grads = torch.autograd.grad(loss, params)
    finally:
        for param in params:
            param.requires_grad_(False)
    return {spec.name: g.detach().float() for spec, g in zip(lora.layout.tensors, grads, strict=True)}


def sensitivity_mask(
    model: str,
    layout: LoraLayout,
    theta: dict[str, torch.Tensor],
    texts: Sequence[str],
    fraction: float,
    *,
    num_batches: int = 4,
    batch_size: int = 8,
    max_len: int = 128,
    num_threads: int | None = None,
) -> dict[str, torch.Tensor]:
    """The bool mask keeping the `fraction` most sensitive adapter coordinates (batches cycle over `texts`)."""
    if not texts:
        raise ValueError("texts: need at least one text")
    if num_batches < 1 or batch_size < 1:
        raise ValueError("num_batches and batch_size must be >= 1")
    lora = PeftLora(BaselineConfig(model, num_threads=num_threads), layout, theta)
    keep_first = 1 if lora.tokenizer.bos_token_id is not None else 0
    encoded = [tuple(_truncate_left(lora.tokenizer(t).input_ids, max_len, keep_first)) for t in texts]
    encoded = [ids for ids in encoded if len(ids) >= 2]
    if not encoded:
        raise ValueError("texts: every text is shorter than two tokens")

    def grad_fn(batch: int) -> dict[str, torch.Tensor]:
        rows = [encoded[(batch * batch_size + i) % len(encoded)] for i in range(batch_size)]
        return lm_loss_gradients(lora, [ScoringSequence(ids, target_start=1) for ids in rows])

    return topk_mask(sensitivity_scores(layout, grad_fn, num_batches), layout, fraction)
