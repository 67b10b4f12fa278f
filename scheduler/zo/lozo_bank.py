"""LoZO-bank: a low-rank ZO delta of the base linear weights, held as the LoRA adapter's B·A.

Each target linear gets ΔW = B·A (B [out, R], A [R, in], R the adapter's LoRA rank, the rank budget). The R
rank columns are split into a frozen **bank** [0, used) holding the accumulated update and the current **window**
[used, used + k) (k = `rank`). Window w covers steps [w·ν, (w+1)·ν) (ν = `basis_interval`, LoZO's lazy V):

- at its first step the window is entered: A[used:used+k] := Vᵀ (V [in, k] from the window's basis seed, N(0, 1)),
  B[:, used:used+k] := 0;
- each step's direction i is Uᵢ [out, k] (fresh from direction seed i) in B's window columns and 0 elsewhere,
  so a probe changes ΔW by exactly ±ε·Uᵢ·Vᵀ, and the update is B_win ← B_win − lr·Σᵢ cᵢUᵢ, i.e. ΔW moves by
  −lr·ĝ with LoZO's estimate ĝ = Σᵢ cᵢUᵢVᵀ (cᵢ carries LoZO's 1/k, see `lozo.py`); with `momentum` > 0,
  LoZO-M's momentum in the window's U-space instead (`BankSgd`);
- entering window w ≥ 1 freezes window w − 1 into the bank (used grows by k). When used + k would pass R, the
  live columns are re-compressed to their best rank-(R − k) approximation (truncated SVD, Eckart–Young) and
  the window goes right after them. So used_w = min(w·k, R − k): a function of the step and the
  hyper-parameters, never stored.

Initial state: this module *defines* it. Entering window 0 sets A := 0 and B := 0 (ΔW = 0) before writing
V₀ᵀ, whatever the adapter held; so a lozo-bank job started on an already trained adapter restarts its delta
from zero. (A fresh adapter's PEFT init has B = 0, so its ΔW is 0 already.)

Entering a window is a pure function of (θ, step, basis seed) applied lazily: `state_for_step` gives the
probe writers θ as the step sees it (a new dict at a window's first step, θ itself otherwise) and
`BankSgd.apply` enters the window in place before its update. Store replay therefore needs only the records,
and a served version is always the exact ΔW of its step (entering a window never changes a served state).

Re-compression is deterministic for bitwise replay: QR of B_live and A_liveᵀ, SVD of the small [L, L] core,
all in float64 on CPU (LAPACK), each singular pair's sign fixed so the largest-|·| entry of its left vector
is positive, then B_bank = U·S and A_bank = Vᵀ rounded to float32. No dense [out, in] matrix is formed.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from scheduler.zo.lora_layout import LoraLayout, TensorSpec
from scheduler.zo.lozo import window_step_seeds
from scheduler.zo.zo_step import Perturbation, StepRecord, StepSeeds, TrainState, buffer_key


def bank_rank(window: int, rank: int, max_rank: int) -> int:
    """used_w: rank columns the bank holds while window w runs (k = rank, R = max_rank)."""
    return min(window * rank, max_rank - rank)


def truncated_factors(b: torch.Tensor, a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B_k [out, k], A_k [k, in]) with B_k·A_k the best rank-k approximation of b·a, in float32.

    b [out, L], a [L, in]. Deterministic (float64 LAPACK, fixed signs); zero-padded when b·a has rank < k.
    """
    b64, a64 = b.to(torch.float64), a.to(torch.float64)
    q_b, r_b = torch.linalg.qr(b64)  # [out, p], [p, L]
    q_a, r_a = torch.linalg.qr(a64.T)  # [in, p'], [p', L]
    u_c, s, vh_c = torch.linalg.svd(r_b @ r_a.T, full_matrices=False)  # [p, m], [m], [m, p']
    u = q_b @ u_c  # [out, m]
    vh = vh_c @ q_a.T  # [m, in]
    pivot = u.abs().argmax(dim=0)  # [m]
    signs = torch.sign(u.gather(0, pivot[None, :])[0])  # [m]
    signs = torch.where(signs == 0, torch.ones_like(signs), signs)
    u, vh = u * signs, vh * signs[:, None]
    m = min(k, s.shape[0])
    b_k = torch.zeros((b.shape[0], k), dtype=torch.float32)
    a_k = torch.zeros((k, a.shape[1]), dtype=torch.float32)
    b_k[:, :m] = (u[:, :m] * s[:m]).to(torch.float32)
    a_k[:m] = vh[:m].to(torch.float32)
    return b_k, a_k


def _module_pairs(layout: LoraLayout) -> dict[str, tuple[TensorSpec, TensorSpec]]:
    """module → (A spec, B spec)."""
    specs: dict[str, dict[str, TensorSpec]] = {}
    for spec in layout.tensors:
        specs.setdefault(spec.module, {})[spec.kind] = spec
    return {module: (kinds["A"], kinds["B"]) for module, kinds in specs.items()}


@dataclass(frozen=True)
class BankPerturbation:
    rank: int  # k: the window's rank
    basis_interval: int  # ν
    mezo_directions = False

    def _check(self, layout: LoraLayout) -> int:
        max_rank = layout.shape.rank
        if self.rank >= max_rank:
            raise ValueError(f"rank: lozo-bank needs rank {self.rank} < the adapter's LoRA rank {max_rank}")
        return max_rank

    def window(self, layout: LoraLayout, step: int) -> slice:
        """The rank columns of the window that step `step` trains."""
        used = bank_rank(step // self.basis_interval, self.rank, self._check(layout))
        return slice(used, used + self.rank)

    def seeds_for_step(self, job_seed: int, step: int, num_directions: int) -> StepSeeds:
        """As LoZO's: V of the step's window, and at a window's first step > 0 the previous window's V too."""
        return window_step_seeds(job_seed, step, num_directions, self.basis_interval)

    def basis(self, layout: LoraLayout, seed: int) -> Iterator[tuple[TensorSpec, torch.Tensor]]:
        """(A spec, V [in, k]) per module, one randn per A tensor in layout order."""
        generator = torch.Generator(device="cpu").manual_seed(int(seed))
        for spec in layout.tensors:
            if spec.kind == "A":
                yield spec, torch.randn((spec.shape[1], self.rank), generator=generator, dtype=torch.float32)

    def factors(self, layout: LoraLayout, seeds: StepSeeds) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
        """(B spec, [Uᵢ [out, k] per direction]) per module, one randn per B tensor and direction."""
        generators = [torch.Generator(device="cpu").manual_seed(int(s)) for s in seeds.direction_seeds]
        for spec in layout.tensors:
            if spec.kind == "B":
                shape = (spec.shape[0], self.rank)
                yield spec, [torch.randn(shape, generator=g, dtype=torch.float32) for g in generators]

    def stream(self, layout: LoraLayout, seeds: StepSeeds) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
        window = self.window(layout, seeds.step)
        us = dict(self.factors(layout, seeds))
        for spec in layout.tensors:
            if spec.kind == "A":  # V lives in θ (A's window rows), not in the direction
                zero = torch.zeros(spec.shape)
                yield spec, [zero for _ in seeds.direction_seeds]
                continue
            ds = []
            for u in us[spec]:
                d = torch.zeros(spec.shape)  # [out, R]
                d[:, window] = u
                ds.append(d)
            yield spec, ds

    def radii(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(1.0 for _ in seeds.direction_seeds)

    def weights(self, seeds: StepSeeds) -> tuple[float, ...]:
        return tuple(1.0 / self.rank for _ in seeds.direction_seeds)

    # --------------------------------------------------------------------------- entering a window
    def entered(self, theta: dict[str, torch.Tensor], layout: LoraLayout, seeds: StepSeeds) -> dict[str, torch.Tensor]:
        """θ with window `seeds.step // ν` entered (new tensors; θ is not written). Only at a window's first step."""
        max_rank = self._check(layout)
        if seeds.basis_seed is None:
            raise ValueError("seeds: lozo-bank needs a basis_seed")
        w = seeds.step // self.basis_interval
        k = self.rank
        used = bank_rank(w, k, max_rank)
        live = bank_rank(w - 1, k, max_rank) + k if w > 0 else 0  # columns holding ΔW before entering
        out = dict(theta)
        vs = dict(self.basis(layout, seeds.basis_seed))
        for a_spec, b_spec in _module_pairs(layout).values():
            a, b = theta[a_spec.name], theta[b_spec.name]  # [R, in], [out, R]
            a_new, b_new = torch.zeros_like(a), torch.zeros_like(b)
            if live > used:  # over budget: the best rank-(R − k) approximation of the live columns
                b_new[:, :used], a_new[:used] = truncated_factors(b[:, :live], a[:live], used)
            elif live:
                b_new[:, :live], a_new[:live] = b[:, :live], a[:live]
            a_new[used : used + k] = vs[a_spec].T  # [k, in]
            out[a_spec.name], out[b_spec.name] = a_new, b_new
        return out

    def state_for_step(
        self, theta: dict[str, torch.Tensor], layout: LoraLayout, seeds: StepSeeds
    ) -> dict[str, torch.Tensor]:
        """θ as step `seeds.step` probes and updates it (see `zo_step.step_base`)."""
        if seeds.step % self.basis_interval != 0:
            return theta
        return self.entered(theta, layout, seeds)


@dataclass(frozen=True)
class BankSgd:
    """SGD on the window: enter the window at its first step, then B_win ← B_win − lr·g, g = Σᵢ cᵢUᵢ [out, k].

    With momentum β > 0, LoZO-M's rule in the window's U-space (buffer "bank_m:<B name>", N [out, k]):
    N ← g at step 0; N ← β·N·V_oldᵀV_new/in + (1−β)·g at a window's first step (N re-expressed in the new
    window's basis, as LoZO-M does at a refresh); N ← β·N + (1−β)·g otherwise; then B_win ← B_win − lr·N.
    """

    rank: int  # k, the perturbation's
    momentum: float = 0.0

    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]:
        if not self.momentum:
            return {}
        return {
            buffer_key("bank_m", spec.name): torch.zeros((spec.shape[0], self.rank))
            for spec in layout.tensors
            if spec.kind == "B"
        }

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        if not isinstance(perturbation, BankPerturbation) or perturbation.rank != self.rank:
            raise TypeError("BankSgd needs a BankPerturbation of the same rank")
        seeds = record.seeds
        theta = state.theta
        stepped = perturbation.state_for_step(theta, layout, seeds)
        if stepped is not theta:
            for name, value in stepped.items():
                theta[name].copy_(value)
        window = perturbation.window(layout, seeds.step)
        beta = float(self.momentum)
        bases = None
        if beta and seeds.prev_basis_seed is not None:
            old = {spec.module: v for spec, v in perturbation.basis(layout, seeds.prev_basis_seed)}
            new = {spec.module: v for spec, v in perturbation.basis(layout, seeds.basis_seed)}
            bases = old, new
        for spec, us in perturbation.factors(layout, seeds):
            grad = torch.zeros_like(us[0])  # Σᵢ cᵢUᵢ  [out, k]
            for c, u in zip(record.coeffs, us, strict=True):
                grad.add_(u, alpha=float(c))
            if beta:
                n_buf = state.buffers[buffer_key("bank_m", spec.name)]  # [out, k]
                if seeds.step == 0:
                    n_buf.copy_(grad)
                elif bases is not None:
                    v_old, v_new = bases[0][spec.module], bases[1][spec.module]  # [in, k] each
                    projected = n_buf @ v_old.T @ v_new / v_new.shape[0]  # [out, k] @ [k, in] @ [in, k] → [out, k]
                    n_buf.copy_(projected.mul_(beta).add_(grad, alpha=1.0 - beta))
                else:
                    n_buf.mul_(beta).add_(grad, alpha=1.0 - beta)
                grad = n_buf
            theta[spec.name][:, window].add_(grad, alpha=-float(record.lr))
