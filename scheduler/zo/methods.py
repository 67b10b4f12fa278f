"""Registry of ZO methods: a job spec's method name + hyper-parameters → perturbation, estimator, optimiser.

| name          | directions dᵢ                  | probes / step | update                          | buffers   |
|---------------|--------------------------------|---------------|---------------------------------|-----------|
| `mezo-sgd`    | z (optionally scaled / masked) | 2q            | MeZO-SGD (`mezo.apply_update`)  | —         |
| `zo-sgd-sign` | z (opt. scaled / masked)       | 2q            | θ − lr·sign(ĝ)                  | —         |
| `zo-sgd-mmt`  | z (opt. scaled / masked)       | 2q            | heavy-ball momentum             | momentum  |
| `zo-adam`     | z (opt. scaled / masked)       | 2q            | Adam with bias correction       | adam_m, v |
| `zo-sgd-cons` | z (opt. scaled / masked)       | 2q+1, then 2  | best of θ, θ ∓ lr·ĝ (ZO-Bench)  | —         |
| `lozo`        | Uᵢ·Vᵀ, V every ν steps         | 2q            | SGD                             | —         |
| `lozo-m`      | Uᵢ·Vᵀ, V every ν steps         | 2q            | momentum in U-space             | lozo_m    |
| `kerzoo`      | z at ±ε·rᵢ, weighted K(rᵢ)     | 2q            | MeZO-SGD                        | —         |
| `lozo-bank`   | ΔW = B·A ± ε·UᵢVᵀ, V per ν     | 2q            | SGD, or LoZO-M's if momentum>0  | bank_m    |

Papers: ZO-Bench (Zhang et al., ICML 2024) for the zo-* rows, see `optimisers.py` and `zo_step.next_probes`;
LoZO (Chen et al., 2024) in `lozo.py`; the LoZO update bank
(window frozen into a bank every ν steps, re-compressed by truncated SVD past the adapter's rank) in
`lozo_bank.py`; KerZOO (Mi et al., 2025) in `kerzoo.py`; MeZO (Malladi et al., 2023).

Block scales and sparse masks are per-job artifacts (loaded by the server from its own storage, never from a
caller's path) passed to `build_method`; they apply to the Gaussian-direction methods. Hyper-parameters are
frozen dataclasses validated on construction: a bad value raises `InvalidHyperParameter` naming the field.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from scheduler.zo.gaussian import GaussianPerturbation
from scheduler.zo.kerzoo import KernelPerturbation
from scheduler.zo.lozo import LowRankPerturbation, LozoMomentum
from scheduler.zo.lozo_bank import BankPerturbation, BankSgd
from scheduler.zo.optimisers import Adam, MezoSgd, MomentumSgd, Sgd, SignSgd
from scheduler.zo.zo_step import ZoMethod

MAX_DIRECTIONS = 128  # a version record holds at most 255 seeds; LoZO adds two basis seeds


class InvalidHyperParameter(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def _number(value: object, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise InvalidHyperParameter(field, f"{value!r} is not a finite number")
    return float(value)


def _positive(value: object, field: str) -> None:
    if _number(value, field) <= 0.0:
        raise InvalidHyperParameter(field, f"{value!r} must be > 0")


def _non_negative(value: object, field: str) -> None:
    if _number(value, field) < 0.0:
        raise InvalidHyperParameter(field, f"{value!r} must be ≥ 0")


def _unit_interval(value: object, field: str) -> None:
    if not 0.0 <= _number(value, field) < 1.0:
        raise InvalidHyperParameter(field, f"{value!r} must be in [0, 1)")


def _count(value: object, field: str, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise InvalidHyperParameter(field, f"{value!r} must be an integer in [{low}, {high}]")


def _common(h: Any) -> None:
    _positive(h.lr, "lr")
    _positive(h.eps, "eps")
    _count(h.num_directions, "num_directions", 1, MAX_DIRECTIONS)
    _non_negative(h.weight_decay, "weight_decay")


@dataclass(frozen=True)
class SgdHyper:  # mezo-sgd, zo-sgd-sign, zo-sgd-cons, kerzoo
    lr: float = 1e-4
    eps: float = 1e-3
    num_directions: int = 1
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        _common(self)


@dataclass(frozen=True)
class MomentumHyper:  # zo-sgd-mmt
    lr: float = 1e-4
    eps: float = 1e-3
    num_directions: int = 1
    weight_decay: float = 0.0
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _common(self)
        _unit_interval(self.momentum, "momentum")


@dataclass(frozen=True)
class AdamHyper:  # zo-adam
    lr: float = 1e-4
    eps: float = 1e-3
    num_directions: int = 1
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999
    adam_eps: float = 1e-8

    def __post_init__(self) -> None:
        _common(self)
        _unit_interval(self.beta1, "beta1")
        _unit_interval(self.beta2, "beta2")
        _positive(self.adam_eps, "adam_eps")


@dataclass(frozen=True)
class LozoHyper:  # lozo, lozo-m (momentum is read by lozo-m only)
    lr: float = 1e-4
    eps: float = 1e-3
    num_directions: int = 1
    weight_decay: float = 0.0
    rank: int = 2
    basis_interval: int = 50
    momentum: float = 0.9

    def __post_init__(self) -> None:
        _common(self)
        _count(self.rank, "rank", 1, 4096)
        _count(self.basis_interval, "basis_interval", 1, 2**31)
        _unit_interval(self.momentum, "momentum")


@dataclass(frozen=True)
class LozoBankHyper:  # lozo-bank; rank k must be below the adapter's LoRA rank (checked on the layout)
    lr: float = 1e-4
    eps: float = 1e-3
    num_directions: int = 1
    weight_decay: float = 0.0  # must be 0: decaying θ would shrink the window's V rows, not ΔW
    rank: int = 2
    basis_interval: int = 50
    momentum: float = 0.0  # 0: SGD; > 0: LoZO-M's momentum in the window's U-space

    def __post_init__(self) -> None:
        _common(self)
        if self.weight_decay:
            raise InvalidHyperParameter("weight_decay", "must be 0 for lozo-bank")
        _count(self.rank, "rank", 1, 4096)
        _count(self.basis_interval, "basis_interval", 1, 2**31)
        _unit_interval(self.momentum, "momentum")


@dataclass(frozen=True)
class DirectionArtifacts:
    block_scales: Mapping[str, float] | None = None  # normalised (`block_scales.normalise_scales`)
    mask: Mapping[str, torch.Tensor] | None = None  # bool per tensor (`sparse_mask.topk_mask`)


def _gaussian(h: Any, artifacts: DirectionArtifacts) -> GaussianPerturbation:
    if artifacts.mask is not None and h.weight_decay:
        raise InvalidHyperParameter("weight_decay", "must be 0 with a sparse mask (unmasked coordinates stay fixed)")
    return GaussianPerturbation(artifacts.block_scales, artifacts.mask)


def _no_artifacts(name: str, artifacts: DirectionArtifacts) -> None:
    if artifacts.block_scales is not None:
        raise InvalidHyperParameter("block_scales", f"not supported by {name}")
    if artifacts.mask is not None:
        raise InvalidHyperParameter("mask", f"not supported by {name}")


def _method(name: str, h: Any, perturbation: Any, optimiser: Any, conservative: bool = False) -> ZoMethod:
    return ZoMethod(name, h.eps, h.num_directions, h.weight_decay, perturbation, optimiser, conservative)


def _sgd_for(perturbation: GaussianPerturbation, weight_decay: float) -> MezoSgd | Sgd:
    return MezoSgd(weight_decay) if perturbation.mezo_directions else Sgd(weight_decay)


def _build_mezo(h: SgdHyper, a: DirectionArtifacts) -> ZoMethod:
    p = _gaussian(h, a)
    return _method("mezo-sgd", h, p, _sgd_for(p, h.weight_decay))


def _build_sign(h: SgdHyper, a: DirectionArtifacts) -> ZoMethod:
    return _method("zo-sgd-sign", h, _gaussian(h, a), SignSgd(h.weight_decay))


def _build_mmt(h: MomentumHyper, a: DirectionArtifacts) -> ZoMethod:
    return _method("zo-sgd-mmt", h, _gaussian(h, a), MomentumSgd(h.momentum, h.weight_decay))


def _build_adam(h: AdamHyper, a: DirectionArtifacts) -> ZoMethod:
    return _method("zo-adam", h, _gaussian(h, a), Adam(h.beta1, h.beta2, h.adam_eps, h.weight_decay))


def _build_cons(h: SgdHyper, a: DirectionArtifacts) -> ZoMethod:
    p = _gaussian(h, a)
    return _method("zo-sgd-cons", h, p, _sgd_for(p, h.weight_decay), conservative=True)


def _build_lozo(h: LozoHyper, a: DirectionArtifacts) -> ZoMethod:
    _no_artifacts("lozo", a)
    return _method("lozo", h, LowRankPerturbation(h.rank, h.basis_interval), Sgd(h.weight_decay))


def _build_lozo_m(h: LozoHyper, a: DirectionArtifacts) -> ZoMethod:
    _no_artifacts("lozo-m", a)
    optimiser = LozoMomentum(h.rank, h.momentum, h.weight_decay)
    return _method("lozo-m", h, LowRankPerturbation(h.rank, h.basis_interval), optimiser)


def _build_lozo_bank(h: LozoBankHyper, a: DirectionArtifacts) -> ZoMethod:
    _no_artifacts("lozo-bank", a)
    return _method("lozo-bank", h, BankPerturbation(h.rank, h.basis_interval), BankSgd(h.rank, h.momentum))


def _build_kerzoo(h: SgdHyper, a: DirectionArtifacts) -> ZoMethod:
    _no_artifacts("kerzoo", a)
    return _method("kerzoo", h, KernelPerturbation(), MezoSgd(h.weight_decay))


@dataclass(frozen=True)
class MethodEntry:
    hyper_cls: type
    build: Callable[[Any, DirectionArtifacts], ZoMethod]


REGISTRY: dict[str, MethodEntry] = {
    "mezo-sgd": MethodEntry(SgdHyper, _build_mezo),
    "zo-sgd-sign": MethodEntry(SgdHyper, _build_sign),
    "zo-sgd-mmt": MethodEntry(MomentumHyper, _build_mmt),
    "zo-adam": MethodEntry(AdamHyper, _build_adam),
    "zo-sgd-cons": MethodEntry(SgdHyper, _build_cons),
    "lozo": MethodEntry(LozoHyper, _build_lozo),
    "lozo-m": MethodEntry(LozoHyper, _build_lozo_m),
    "kerzoo": MethodEntry(SgdHyper, _build_kerzoo),
    "lozo-bank": MethodEntry(LozoBankHyper, _build_lozo_bank),
}


def _entry(name: str) -> MethodEntry:
    if name not in REGISTRY:
        raise InvalidHyperParameter("method", f"{name!r} is not one of {sorted(REGISTRY)}")
    return REGISTRY[name]


def parse_hyper(name: str, params: Mapping[str, object]) -> Any:
    """The hyper-parameter dataclass of method `name` from a job spec's plain mapping (unknown keys rejected)."""
    cls = _entry(name).hyper_cls
    known = {f.name for f in dataclasses.fields(cls)}
    for key in params:
        if key not in known:
            raise InvalidHyperParameter(str(key), f"not a hyper-parameter of {name} (expected one of {sorted(known)})")
    values = dict(params)
    for f in dataclasses.fields(cls):  # records store numbers as floats: 2.0 is a fine rank
        value = values.get(f.name)
        if f.type == "int" and isinstance(value, float) and value.is_integer():
            values[f.name] = int(value)
    return cls(**values)


def hyper_items(hyper: Any) -> tuple[tuple[str, float], ...]:
    """(name, value) pairs for a version record's `hparams` and for the wire; `parse_hyper` reverses it."""
    return tuple((f.name, getattr(hyper, f.name)) for f in dataclasses.fields(hyper))


def build_method(
    name: str,
    hyper: Any,
    *,
    block_scales: Mapping[str, float] | None = None,
    mask: Mapping[str, torch.Tensor] | None = None,
) -> ZoMethod:
    entry = _entry(name)
    if not isinstance(hyper, entry.hyper_cls):
        raise InvalidHyperParameter("hyper", f"{name} takes {entry.hyper_cls.__name__}, not {type(hyper).__name__}")
    return entry.build(hyper, DirectionArtifacts(block_scales, mask))
