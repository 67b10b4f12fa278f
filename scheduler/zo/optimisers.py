"""Update rules over (seeds, coefficients): ZO-SGD, ZO-SGD-Sign, ZO-SGD-MMT and ZO-Adam.

Zhang et al., "Revisiting Zeroth-Order Optimization for Memory-Efficient
LLM Fine-Tuning: A Benchmark" (ZO-Bench), ICML 2024, Appendix A. With ĝ = Σᵢ cᵢdᵢ the step's estimate (dᵢ
regenerated from the record's seeds) and g = ĝ + wd·θ (weight decay as an L2 term, as torch's SGD/Adam that
ZO-Bench drives):

- ZO-SGD:      θ ← θ − lr·g                                   (MeZO; `mezo.apply_update` is the definition)
- ZO-SGD-Sign: θ ← θ − lr·(sign(ĝ) + wd·θ)                    (paper's element-wise sign of the estimate;
               ZO-Bench's trainer code uses sign(gᵢ)·zᵢ instead, which is not what the paper states)
- ZO-SGD-MMT:  m ← β·m + g;  θ ← θ − lr·m                       (torch SGD momentum, dampening 0)
- ZO-Adam:     m ← β₁m + (1−β₁)g;  v ← β₂v + (1−β₂)g²;  t = step + 1;
               θ ← θ − lr·(m / (1−β₁ᵗ)) / (√(v / (1−β₂ᵗ)) + ε_adam)

The buffers m and v are θ-shaped fp32 tensors versioned with θ (`TrainState.buffers`); the record only
carries seeds, cᵢ and lr, so replaying the records from a snapshot of (θ, buffers) is exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from scheduler.zo import mezo
from scheduler.zo.lora_layout import LoraLayout
from scheduler.zo.zo_step import Perturbation, StepRecord, TrainState, buffer_key


def _estimate(ds: list[torch.Tensor], coeffs: tuple[float, ...], like: torch.Tensor) -> torch.Tensor:
    """ĝ restricted to one tensor: Σᵢ cᵢ·dᵢ, accumulated in MeZO's order."""
    grad = torch.zeros_like(like)  # [shape]
    for c, d in zip(coeffs, ds, strict=True):
        grad.add_(d, alpha=float(c))
    return grad


def _zero_buffers(layout: LoraLayout, names: tuple[str, ...]) -> dict[str, torch.Tensor]:
    return {buffer_key(b, spec.name): torch.zeros(spec.shape) for b in names for spec in layout.tensors}


@dataclass(frozen=True)
class MezoSgd:
    """MeZO-SGD exactly: delegates to `mezo.apply_update` (directions must be MeZO's z unchanged)."""

    weight_decay: float = 0.0

    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        if not perturbation.mezo_directions:
            raise TypeError("MezoSgd needs MeZO's own directions; use Sgd for scaled, masked or low-rank ones")
        mezo.apply_update(
            state.theta, layout, record.seeds.direction_seeds, record.coeffs, record.lr, self.weight_decay
        )


@dataclass(frozen=True)
class Sgd:
    """ZO-SGD over any direction family, with MeZO's arithmetic (same op order as `mezo.apply_update`)."""

    weight_decay: float = 0.0

    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        for spec, ds in perturbation.stream(layout, record.seeds):
            param = state.theta[spec.name]  # [shape]
            grad = _estimate(ds, record.coeffs, param)
            if self.weight_decay:
                grad.add_(param, alpha=float(self.weight_decay))
            param.add_(grad, alpha=-float(record.lr))


@dataclass(frozen=True)
class SignSgd:
    weight_decay: float = 0.0

    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]:
        return {}

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        for spec, ds in perturbation.stream(layout, record.seeds):
            param = state.theta[spec.name]  # [shape]
            step = torch.sign(_estimate(ds, record.coeffs, param))  # [shape], entries in {−1, 0, 1}
            if self.weight_decay:
                step.add_(param, alpha=float(self.weight_decay))
            param.add_(step, alpha=-float(record.lr))


@dataclass(frozen=True)
class MomentumSgd:
    momentum: float = 0.9
    weight_decay: float = 0.0

    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]:
        return _zero_buffers(layout, ("momentum",))

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        for spec, ds in perturbation.stream(layout, record.seeds):
            param = state.theta[spec.name]  # [shape]
            grad = _estimate(ds, record.coeffs, param)
            if self.weight_decay:
                grad.add_(param, alpha=float(self.weight_decay))
            buf = state.buffers[buffer_key("momentum", spec.name)]  # [shape]
            buf.mul_(float(self.momentum)).add_(grad)
            param.add_(buf, alpha=-float(record.lr))


@dataclass(frozen=True)
class Adam:
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8
    weight_decay: float = 0.0

    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]:
        return _zero_buffers(layout, ("adam_m", "adam_v"))

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        t = record.seeds.step + 1
        bias1 = 1.0 - float(self.beta1) ** t
        bias2 = 1.0 - float(self.beta2) ** t
        for spec, ds in perturbation.stream(layout, record.seeds):
            param = state.theta[spec.name]  # [shape]
            grad = _estimate(ds, record.coeffs, param)
            if self.weight_decay:
                grad.add_(param, alpha=float(self.weight_decay))
            m = state.buffers[buffer_key("adam_m", spec.name)]  # [shape]
            v = state.buffers[buffer_key("adam_v", spec.name)]  # [shape]
            m.mul_(float(self.beta1)).add_(grad, alpha=1.0 - float(self.beta1))
            v.mul_(float(self.beta2)).addcmul_(grad, grad, value=1.0 - float(self.beta2))
            denom = (v / bias2).sqrt_().add_(float(self.adam_eps))  # [shape]
            param.addcdiv_(m, denom, value=-float(record.lr) / bias1)
