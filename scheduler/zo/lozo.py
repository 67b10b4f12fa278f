"""LoZO and LoZO-M: low-rank perturbations U·Vᵀ with a lazily refreshed V.

Chen et al., "Enhancing Zeroth-order Fine-tuning for Language Models with Low-rank
Structures", arXiv:2410.07698 (ICLR 2025); reference code github.com/optsuite/LOZO.

Each adapter tensor X ∈ R^{m×n} (a LoRA A [r, in] or B [out, r]) is perturbed by dᵢ = Uᵢ·Vᵀ with
Uᵢ ∈ R^{m×k} fresh every step (from direction seed i) and V ∈ R^{n×k} drawn from a basis seed that depends on
step // ν only, so V changes exactly every ν steps and is shared by the q directions of a step. Entries are
N(0, 1). Since E_U[UVᵀ·⟨G, UVᵀ⟩] = G·VVᵀ and E[VVᵀ] = k·I, the low-rank estimate

    ĝ = (1/q) Σᵢ (L(X + ε UᵢVᵀ) − L(X − ε UᵢVᵀ)) / 2ε · UᵢVᵀ / k

is unbiased over (U, V) (given V it is the projection G·VVᵀ/k). The paper's code leaves the 1/k to the
learning rate; here it is the estimator weight wᵢ = 1/k, so lr means the same thing across methods.

LoZO  (SGD):  X ← X − lr·(Σᵢ cᵢ UᵢVᵀ + wd·X).
LoZO-M: momentum N ∈ R^{m×k} lives in the U-space of the current V (as in the reference code):
    step 0:                  N ← Σᵢ cᵢUᵢ
    refresh step (t % ν = 0): N ← β·N·V_oldᵀV_new / n + (1−β)·Σᵢ cᵢUᵢ     (re-express N in the new basis)
    otherwise:               N ← β·N + (1−β)·Σᵢ cᵢUᵢ
    X ← X − lr·(N·Vᵀ + wd·X).
A refresh step is marked by `StepSeeds.prev_basis_seed`, so replay needs no ν, only the record.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from scheduler.zo.directions import derive_seeds
from scheduler.zo.lora_layout import LoraLayout, TensorSpec
from scheduler.zo.zo_step import Perturbation, StepRecord, StepSeeds, TrainState, buffer_key

_BASIS_SALT = 0x6C6F7A6F  # "lozo": the V seeds come from their own sequence, never equal to a U seed's
_SEED_MOD = 2**63


def basis_seed(job_seed: int, window: int) -> int:
    """The seed of V for steps [window·ν, (window+1)·ν)."""
    return derive_seeds((int(job_seed) ^ _BASIS_SALT) % _SEED_MOD, window, 1)[0]


def window_step_seeds(job_seed: int, step: int, num_directions: int, basis_interval: int) -> StepSeeds:
    """A step's direction seeds and its window's V seed; at a window's first step > 0 (a refresh) the
    previous window's V seed too."""
    window = step // basis_interval
    refresh = step > 0 and step % basis_interval == 0
    return StepSeeds(
        step,
        tuple(derive_seeds(job_seed, step, num_directions)),
        basis_seed(job_seed, window),
        basis_seed(job_seed, window - 1) if refresh else None,
    )


@dataclass(frozen=True)
class LowRankPerturbation:
    rank: int  # k
    basis_interval: int  # ν
    mezo_directions = False

    def seeds_for_step(self, job_seed: int, step: int, num_directions: int) -> StepSeeds:
        return window_step_seeds(job_seed, step, num_directions, self.basis_interval)

    def basis(self, layout: LoraLayout, seed: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """V [n, k] per tensor, one randn per tensor in layout order from the basis seed's generator."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        for spec in layout.tensors:
            yield spec, torch.randn((spec.shape[1], self.rank), generator=generator, dtype=torch.float32)

    def factors(
        self, layout: LoraLayout, seeds: StepSeeds
    ) -> Iterator[tuple[TensorSpec, list[torch.Tensor], torch.Tensor]]:
        """(spec, [Uᵢ [m, k] per direction], V [n, k]) tensor by tensor."""
        if seeds.basis_seed is None:
            raise ValueError("seeds: LoZO needs a basis_seed")
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds.direction_seeds]
        for spec, v in self.basis(layout, seeds.basis_seed):
            us = [torch.randn((spec.shape[0], self.rank), generator=g, dtype=torch.float32) for g in generators]
            yield spec, us, v

    def stream(self, layout: LoraLayout, seeds: StepSeeds) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
        for spec, us, v in self.factors(layout, seeds):
            yield spec, [u @ v.T for u in us]  # [m, k] @ [k, n] → [m, n]

    def radii(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(1.0 for _ in seeds.direction_seeds)

    def weights(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(1.0 / self.rank for _ in seeds.direction_seeds)


@dataclass(frozen=True)
class LozoMomentum:
    """LoZO-M's update; buffer "lozo_m:<name>" is N [m, k] per tensor."""

    rank: int
    momentum: float = 0.9
    weight_decay: float = 0.0

    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]:
        return {buffer_key("lozo_m", spec.name): torch.zeros((spec.shape[0], self.rank)) for spec in layout.tensors}

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        if not isinstance(perturbation, LowRankPerturbation) or perturbation.rank != self.rank:
            raise TypeError("LozoMomentum needs a LowRankPerturbation of the same rank")
        seeds = record.seeds
        beta = float(self.momentum)
        old_bases = (
            perturbation.basis(layout, seeds.prev_basis_seed) if seeds.prev_basis_seed is not None else None
        )
        for spec, us, v in perturbation.factors(layout, seeds):
            param = state.theta[spec.name]  # [m, n]
            n_buf = state.buffers[buffer_key("lozo_m", spec.name)]  # [m, k]
            g_u = torch.zeros_like(n_buf)  # Σᵢ cᵢUᵢ  [m, k]
            for c, u in zip(record.coeffs, us, strict=True):
                g_u.add_(u, alpha=float(c))
            if old_bases is not None:
                _, v_old = next(old_bases)  # [n, k]
                projected = n_buf @ v_old.T @ v / v.shape[0]  # [m, k] @ [k, n] @ [n, k] → [m, k]
                n_buf.copy_(projected.mul_(beta).add_(g_u, alpha=1.0 - beta))
            elif seeds.step == 0:
                n_buf.copy_(g_u)
            else:
                n_buf.mul_(beta).add_(g_u, alpha=1.0 - beta)
            update = n_buf @ v.T  # [m, k] @ [k, n] → [m, n]
            if self.weight_decay:
                update.add_(param, alpha=float(self.weight_decay))
            param.add_(update, alpha=-float(record.lr))
