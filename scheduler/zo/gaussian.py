"""Gaussian directions z(seed) (MeZO's), optionally scaled per tensor and masked per coordinate.

d_i = s_t · m_t ⊙ z_i on tensor t, with z_i drawn exactly as `directions.stream_directions` draws it, so the
plain case is MeZO's direction bit for bit.

- Per-block scales s_t (ZO Fine-tuner style, see `block_scales.py`): E[dᵢdᵢᵀ] = S², so the central-difference
  estimate has expectation S²·∇L, a fixed diagonal preconditioner. The scales are normalised so that
  Σ_t numel_t·s_t² = Σ_t numel_t, i.e. E‖d‖² = E‖z‖²: same perturbation energy as MeZO.
- Sparse masks m_t (SensZOQ style, see `sparse_mask.py`): E[dᵢdᵢᵀ] = diag(m), the estimate has expectation m⊙∇L,
  and with weight decay 0 every optimiser here leaves the unmasked coordinates exactly where they are.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import torch

from scheduler.zo.directions import derive_seeds, stream_directions
from scheduler.zo.lora_layout import LoraLayout, TensorSpec
from scheduler.zo.zo_step import StepSeeds


@dataclass(frozen=True, eq=False)
class GaussianPerturbation:
    block_scales: Mapping[str, float] | None = None  # PEFT name → s_t, already normalised
    mask: Mapping[str, torch.Tensor] | None = None  # PEFT name → bool [shape of the tensor]

    @property
    def mezo_directions(self) -> bool:
        return self.block_scales is None and self.mask is None

    def seeds_for_step(self, job_seed: int, step: int, num_directions: int) -> StepSeeds:
        return StepSeeds(step, tuple(derive_seeds(job_seed, step, num_directions)))

    def stream(self, layout: LoraLayout, seeds: StepSeeds) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
        for spec, zs in stream_directions(layout, seeds.direction_seeds):
            if self.mask is not None:
                keep = self.mask[spec.name]  # bool [shape]
                zs = [torch.where(keep, z, torch.zeros((), dtype=z.dtype)) for z in zs]
            if self.block_scales is not None:
                scale = float(self.block_scales[spec.name])
                zs = [z * scale for z in zs]
            yield spec, zs

    def radii(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(1.0 for _ in seeds.direction_seeds)

    def weights(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(1.0 for _ in seeds.direction_seeds)
