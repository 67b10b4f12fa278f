"""Sparse coordinate masks (SensZOQ style): perturb and update only the most sensitive adapter coordinates.

Guo et al., "Zeroth-Order Fine-Tuning of LLMs with Extreme
Sparsity" (SensZOQ), arXiv:2406.02913 (2024). The sensitivity of coordinate j is its diagonal Fisher estimate
Σ_b (∂L_b/∂θ_j)², computed once from a few backprop steps on unlabelled text; the mask keeps the global top
fraction of coordinates across all adapter tensors. `GaussianPerturbation(mask=...)` then draws m⊙z.

`sensitivity_scores` takes the gradient computation as a callable, so this module has no model code; the
baseline (transformers + PEFT) supplies one. Masks travel as safetensors of bool tensors keyed by PEFT name.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from scheduler.zo.lora_layout import LoraLayout


def sensitivity_scores(
    layout: LoraLayout, grad_fn: Callable[[int], Mapping[str, torch.Tensor]], num_batches: int
) -> dict[str, torch.Tensor]:
    """Σ_b grad_b² per coordinate; grad_fn(b) returns ∂L_b/∂θ for batch b as a θ-shaped dict."""
    if num_batches < 1:
        raise ValueError(f"num_batches: {num_batches} must be ≥ 1")
    scores = {spec.name: torch.zeros(spec.shape, dtype=torch.float32) for spec in layout.tensors}
    for batch in range(num_batches):
        grads = grad_fn(batch)
        for spec in layout.tensors:
            g = grads[spec.name].detach().to(torch.float32)  # [shape]
            scores[spec.name].addcmul_(g, g)
    return scores


def topk_mask(scores: Mapping[str, torch.Tensor], layout: LoraLayout, fraction: float) -> dict[str, torch.Tensor]:
    """Bool masks keeping the ceil(fraction·N) highest-scoring coordinates over the whole layout.

    Ties are broken by position in layout order (earlier wins), so the mask is a pure function of the scores.
    """
    if not (isinstance(fraction, (int, float)) and 0.0 < fraction <= 1.0):
        raise ValueError(f"fraction: {fraction!r} must be in (0, 1]")
    for spec in layout.tensors:
        if spec.name not in scores:
            raise ValueError(f"scores[{spec.name!r}]: missing")
        if tuple(scores[spec.name].shape) != spec.shape:
            raise ValueError(f"scores[{spec.name!r}]: shape {tuple(scores[spec.name].shape)} != {spec.shape}")
    flat = torch.cat([scores[spec.name].reshape(-1).to(torch.float64) for spec in layout.tensors])  # [N]
    if not torch.isfinite(flat).all():
        raise ValueError("scores: must be finite")
    num_keep = max(1, math.ceil(fraction * flat.numel()))
    order = torch.sort(flat, descending=True, stable=True).indices  # [N]
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:num_keep]] = True
    masks: dict[str, torch.Tensor] = {}
    offset = 0
    for spec in layout.tensors:
        masks[spec.name] = keep[offset : offset + spec.numel].reshape(spec.shape)
        offset += spec.numel
    return masks


def validate_mask(mask: Mapping[str, torch.Tensor], layout: LoraLayout) -> dict[str, torch.Tensor]:
    """A mask read back from storage: every tensor present, right shape, cast to bool."""
    out: dict[str, torch.Tensor] = {}
    for spec in layout.tensors:
        if spec.name not in mask:
            raise ValueError(f"mask[{spec.name!r}]: missing")
        if tuple(mask[spec.name].shape) != spec.shape:
            raise ValueError(f"mask[{spec.name!r}]: shape {tuple(mask[spec.name].shape)} != {spec.shape}")
        out[spec.name] = mask[spec.name].to(torch.bool)
    if not any(bool(m.any()) for m in out.values()):
        raise ValueError("mask: keeps no coordinate")
    return out
