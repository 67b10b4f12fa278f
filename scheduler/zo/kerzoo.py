"""KerZOO: kernel-weighted two-point estimates that cancel the cubic bias term.

Mi, Tan, Yu, Zhu, Yuan, Huang, "KerZOO: Kernel Function Informed Zeroth-Order Optimization for Accurate and
Accelerated LLM Fine-Tuning", arXiv:2505.18886 (2025).

Per direction i draw z_i ~ N(0, I) (MeZO's z, same seed) and a scalar r_i ~ U[−1, 1] (from a salted seed so
it is independent of z_i), probe θ ± ε·r_i·z_i and estimate

    ĝ = (1/q) Σᵢ (L(θ + ε rᵢ zᵢ) − L(θ − ε rᵢ zᵢ)) / 2ε · K(rᵢ) · zᵢ.

Taylor: L(θ+εrz) − L(θ−εrz) = 2εr⟨∇L, z⟩ + (ε³r³/3)·∇³L[z,z,z] + O(ε⁵), so E_r[·K(r)] keeps the gradient
term iff E[r·K(r)] = 1 and drops the ε² bias term iff E[r³·K(r)] = 0. With r ~ U[−1, 1] (E[r²] = 1/3,
E[r⁴] = 1/5, E[r⁶] = 1/7) the odd cubic K(r) = a·r + b·r³ needs a/3 + b/5 = 1 and a/5 + b/7 = 0, i.e.

    K(r) = (75/4)·r − (105/4)·r³ = (15/4)·r·(5 − 7r²),

the order-3 Legendre-polynomial kernel, the one the paper gives. |K| ≤ 7.5 on [−1, 1], so a tiny r (a probe drowned in
rounding noise) also gets a tiny weight. The update is MeZO-SGD's, with cᵢ = K(rᵢ)·gᵢ/q.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction

import torch

from scheduler.zo.directions import derive_seeds, stream_directions
from scheduler.zo.lora_layout import LoraLayout, TensorSpec
from scheduler.zo.zo_step import StepSeeds

KERNEL_COEFFS: dict[int, Fraction] = {1: Fraction(75, 4), 3: Fraction(-105, 4)}  # power of r → coefficient
_RADIUS_SALT = 0x6B65727A6F6F  # "kerzoo": r's generator must not replay z's stream
_SEED_MOD = 2**63


def kernel(r: float) -> float:
    """K(r) = (75/4)·r − (105/4)·r³, in float64 arithmetic."""
    return sum(float(c) * r**power for power, c in KERNEL_COEFFS.items())


def radius(seed: int) -> float:
    """r ~ U[−1, 1) for the direction with this seed, from a dedicated generator."""
    generator = torch.Generator(device="cpu").manual_seed((int(seed) ^ _RADIUS_SALT) % _SEED_MOD)
    return float(torch.rand((), generator=generator, dtype=torch.float64)) * 2.0 - 1.0


@dataclass(frozen=True)
class KernelPerturbation:
    mezo_directions = True  # dᵢ = zᵢ; r only moves the probes and weights the difference
    def seeds_for_step(self, job_seed: int, step: int, num_directions: int) -> StepSeeds:
        return StepSeeds(step, tuple(derive_seeds(job_seed, step, num_directions)))

    def stream(self, layout: LoraLayout, seeds: StepSeeds) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
        return stream_directions(layout, seeds.direction_seeds)

    def radii(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(radius(s) for s in seeds.direction_seeds)

    def weights(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(kernel(radius(s)) for s in seeds.direction_seeds)
