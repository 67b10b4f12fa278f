"""Small problems for the pure ZO tests: a two-module LoRA layout (36 parameters) and a diagonal quadratic."""

from __future__ import annotations

import torch

from scheduler.zo.lora_layout import LoraLayout, LoraShape, initial_state, layout_for_linears
from scheduler.zo.zo_step import StepSeeds, ZoMethod


def small_layout() -> LoraLayout:
    linears = {"model.layers.0.self_attn.q_proj": (6, 5), "model.layers.0.self_attn.v_proj": (4, 3)}
    return layout_for_linears(linears, LoraShape(rank=2, alpha=4.0, target_modules=("q_proj", "v_proj")))


class Quadratic:
    """L(θ) = ½ Σ h ⊙ (θ − θ*)², curvature h ∈ [0.5, 1.5], evaluated in float64 (so differences are exact-ish)."""

    def __init__(self, layout: LoraLayout, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.layout = layout
        self.target = {s.name: torch.randn(s.shape, generator=g, dtype=torch.float64) for s in layout.tensors}
        self.curvature = {s.name: 0.5 + torch.rand(s.shape, generator=g, dtype=torch.float64) for s in layout.tensors}
        self._target, self._curvature = flat(self.target, layout), flat(self.curvature, layout)  # [N]

    def __call__(self, theta: dict[str, torch.Tensor]) -> float:
        diff = flat(theta, self.layout) - self._target  # [N]
        return float(0.5 * (self._curvature * diff * diff).sum())

    def grad(self, theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {n: self.curvature[n] * (theta[n].to(torch.float64) - t) for n, t in self.target.items()}


def start_theta(layout: LoraLayout, seed: int = 1) -> dict[str, torch.Tensor]:
    """PEFT init for A, and a non-zero B so every tensor has a gradient."""
    theta = initial_state(layout, seed)
    g = torch.Generator().manual_seed(seed + 100)
    return {k: (v + 0.1 * torch.randn(v.shape, generator=g)) for k, v in theta.items()}


def flat(tensors: dict[str, torch.Tensor], layout: LoraLayout) -> torch.Tensor:
    return torch.cat([tensors[s.name].reshape(-1).to(torch.float64) for s in layout.tensors])


def dense_estimate(method: ZoMethod, layout: LoraLayout, seeds: StepSeeds, coeffs) -> dict[str, torch.Tensor]:
    """ĝ = Σ cᵢ dᵢ in float64, from the method's own direction stream."""
    out = {}
    for spec, ds in method.perturbation.stream(layout, seeds):
        out[spec.name] = sum(float(c) * d.to(torch.float64) for c, d in zip(coeffs, ds, strict=True))
    return out


def assert_near(actual: torch.Tensor, expected: torch.Tensor, atol: float) -> None:
    """max |actual − expected| ≤ atol (torch.testing.assert_close costs seconds of imports on first use)."""
    error = float((actual.to(torch.float64) - expected.to(torch.float64)).abs().max())
    assert error <= atol, f"max abs error {error:.3g} > {atol:.3g}"
