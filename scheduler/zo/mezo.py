"""MeZO-SGD over a LoRA state (Malladi et al., 2023), q directions, optional weight decay.

One step: for each direction i, losses L⁺ᵢ = L(θ + ε zᵢ), L⁻ᵢ = L(θ − ε zᵢ); projected gradient
gᵢ = (L⁺ᵢ − L⁻ᵢ) / 2ε; update θ ← θ − lr · (Σᵢ gᵢ zᵢ / q + wd · θ).
The update is expressed as seeds plus scalar coefficients cᵢ = gᵢ / q, which is all a version record holds.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from scheduler.zo.directions import stream_directions
from scheduler.zo.lora_layout import LoraLayout


@dataclass(frozen=True)
class MezoHyper:
    lr: float = 1e-4
    eps: float = 1e-3
    num_directions: int = 1
    weight_decay: float = 0.0


def projected_gradients(losses_plus: Sequence[float], losses_minus: Sequence[float], eps: float) -> list[float]:
    return [(lp - lm) / (2.0 * eps) for lp, lm in zip(losses_plus, losses_minus, strict=True)]


def update_coefficients(grads: Sequence[float]) -> list[float]:
    """cᵢ such that the update is θ ← θ − lr · (Σ cᵢ zᵢ + wd θ)."""
    return [g / len(grads) for g in grads]


def probe_states(
    theta: dict[str, torch.Tensor], layout: LoraLayout, seeds: Sequence[int], eps: float
) -> Iterator[tuple[str, list[torch.Tensor], list[torch.Tensor]]]:
    """Yield (name, [θ+εzᵢ], [θ−εzᵢ]) tensor by tensor: the 2q probe states, streamed."""
    for spec, zs in stream_directions(layout, seeds):
        base = theta[spec.name]
        yield spec.name, [base + eps * z for z in zs], [base - eps * z for z in zs]


def apply_update(
    theta: dict[str, torch.Tensor],
    layout: LoraLayout,
    seeds: Sequence[int],
    coeffs: Sequence[float],
    lr: float,
    weight_decay: float = 0.0,
) -> None:
    """θ ← θ − lr · (Σ cᵢ zᵢ + wd θ), in place. The single definition of the update's arithmetic."""
    for spec, zs in stream_directions(layout, seeds):
        param = theta[spec.name]
        grad = torch.zeros_like(param)
        for c, z in zip(coeffs, zs, strict=True):
            grad.add_(z, alpha=float(c))
        if weight_decay:
            grad.add_(param, alpha=float(weight_decay))
        param.add_(grad, alpha=-float(lr))
