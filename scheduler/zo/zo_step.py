"""The generic ZO step over adapter states: probe sets, the step protocol, records and replay.

Every method is three pieces put together in `methods.py`:

- a **perturbation** (`Perturbation`): which directions d_i a step uses, regenerated from `StepSeeds` tensor by
  tensor in layout order (Gaussian z, block-scaled z, masked z, LoZO's U·Vᵀ), how far each one is probed
  (a radius ρ_i, 1 except for KerZOO's r_i) and how its finite difference is weighted (w_i: 1, LoZO's 1/k,
  KerZOO's K(r_i));
- an **estimator**, here one for all methods: the central difference cᵢ = wᵢ · (L⁺ᵢ − L⁻ᵢ) / 2ε / q, so that
  the step's gradient estimate is ĝ = Σᵢ cᵢ dᵢ; the conservative variant adds a second round of probes;
- an **optimiser** (`Optimiser`): turns (seeds, cᵢ, lr) into the next θ and optimiser buffers, in place.

A probe slot is an explicit linear combination `Probe`: value = a·θ + Σ_j s_j·d_{i_j}. The step loop asks
`next_probes` for the next round of probe slots until it returns None, scores each slot's sequences, and
closes the step with `finish_step`, which returns the tiny `StepRecord` (seeds, losses, coefficients, lr)
that `apply_record` turns into version N+1, on the worker and in store replay alike.

Engine use, per step (only seeds, probe descriptions and scalars cross the process boundary):

    method = methods.build_method(name, hyper, block_scales=..., mask=...)   # once per job, both sides
    seeds = method.perturbation.seeds_for_step(job_seed, step, method.num_directions)
    losses = ()
    while (probes := next_probes(method, seeds, losses, lr)) is not None:
        worker: for spec, values in probe_values(θ, layout, method.perturbation, seeds, probes):
                    write values[j] into the slot of probe j
        scheduler: score every probe slot's sequences; losses += (one scalar per probe, in order)
    record = finish_step(method, seeds, losses, lr)        # scheduler side, pure
    worker: apply_record(method, state, layout, record)     # θ and buffers → version N+1
    store: (step, seeds.as_tuple(), record.coeffs, record.lr, hyper_items(hyper)) is the version record
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from scheduler.zo import mezo
from scheduler.zo.lora_layout import LoraLayout, TensorSpec


@dataclass(frozen=True)
class StepSeeds:
    """Every seed one step draws from. A pure function of (job seed, step) via `Perturbation.seeds_for_step`."""

    step: int  # updates already applied to the state this step starts from (Adam's t − 1)
    direction_seeds: tuple[int, ...]  # one per direction, fresh every step (z, or LoZO's U)
    basis_seed: int | None = None  # LoZO: V of window step // ν, shared by the window's steps and directions
    prev_basis_seed: int | None = None  # LoZO: V of the previous window, set exactly at a refresh step > 0

    def as_tuple(self) -> tuple[int, ...]:
        """All seeds as one tuple (a version record's `seeds`): directions, then the basis seeds if any."""
        extra = tuple(s for s in (self.basis_seed, self.prev_basis_seed) if s is not None)
        return (*self.direction_seeds, *extra)

    @classmethod
    def from_tuple(cls, step: int, seeds: Sequence[int], num_directions: int) -> StepSeeds:
        extra = tuple(int(s) for s in seeds[num_directions:])
        if len(extra) > 2:
            raise ValueError(f"seeds: {len(seeds)} seeds for {num_directions} directions (at most 2 basis seeds)")
        return cls(
            step,
            tuple(int(s) for s in seeds[:num_directions]),
            extra[0] if extra else None,
            extra[1] if len(extra) > 1 else None,
        )


@dataclass(frozen=True)
class Probe:
    """One probe slot's state: theta_scale·θ + Σ scale·d_direction over `terms`; no terms means θ itself."""

    terms: tuple[tuple[int, float], ...] = ()  # (direction index, scale)
    theta_scale: float = 1.0


def probes_to_wire(probes: Sequence[Probe]) -> tuple:
    """Plain nested tuples for `collective_rpc`: ((theta_scale, ((index, scale), …)), …)."""
    return tuple((p.theta_scale, tuple((int(i), float(c)) for i, c in p.terms)) for p in probes)


def probes_from_wire(wire: Sequence) -> tuple[Probe, ...]:
    return tuple(Probe(tuple((int(i), float(c)) for i, c in terms), float(a)) for a, terms in wire)


@dataclass(frozen=True)
class StepRecord:
    """What a step commits: enough to redo the update from the parent state, nothing tensor-sized."""

    seeds: StepSeeds
    losses: tuple[float, ...]  # every probe loss of the step, round after round (audit; not read by replay)
    coeffs: tuple[float, ...]  # cᵢ: the update direction is ĝ = Σᵢ cᵢ dᵢ
    lr: float  # 0.0 (with zero coeffs) when a conservative step kept θ


@dataclass
class TrainState:
    """θ and the optimiser's buffers, both fp32 and versioned together (the store's AdapterState).

    Buffers are flat, keyed "<buffer>:<PEFT name>" (e.g. "adam_v:base_model...lora_A.weight"), so they fit a
    `dict[str, Tensor]` snapshot beside θ. The optimiser mutates both in place; callers copy before replay.
    """

    theta: dict[str, torch.Tensor]
    buffers: dict[str, torch.Tensor] = field(default_factory=dict)

    def clone(self) -> TrainState:
        return TrainState(
            {k: v.clone() for k, v in self.theta.items()}, {k: v.clone() for k, v in self.buffers.items()}
        )


class Perturbation(Protocol):
    mezo_directions: bool  # dᵢ is exactly MeZO's z(seedᵢ), so MeZO's own update arithmetic applies

    def seeds_for_step(self, job_seed: int, step: int, num_directions: int) -> StepSeeds: ...

    def stream(self, layout: LoraLayout, seeds: StepSeeds) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
        """(tensor spec, [dᵢ restricted to that tensor for each direction]) in layout order."""
        ...

    def radii(self, seeds: StepSeeds) -> tuple[float, ...]:
        """ρᵢ: direction i is probed at θ ± ε·ρᵢ·dᵢ."""
        ...

    def weights(self, seeds: StepSeeds) -> tuple[float, ...]:
        """wᵢ: the finite difference of direction i is multiplied by wᵢ (unbiasedness)."""
        ...


class Optimiser(Protocol):
    def init_buffers(self, layout: LoraLayout) -> dict[str, torch.Tensor]: ...

    def apply(self, state: TrainState, layout: LoraLayout, perturbation: Perturbation, record: StepRecord) -> None:
        """θ (and buffers) ← the next version, in place, from the record alone."""
        ...


@dataclass(frozen=True)
class ZoMethod:
    name: str
    eps: float
    num_directions: int
    weight_decay: float
    perturbation: Perturbation
    optimiser: Optimiser
    conservative: bool = False  # ZO-SGD-Cons: score θ too, then the two candidate updates


def buffer_key(buffer: str, name: str) -> str:
    return f"{buffer}:{name}"


# ----------------------------------------------------------------------------------------- the step protocol
def two_point_probes(method: ZoMethod, seeds: StepSeeds) -> tuple[Probe, ...]:
    """Slots 2i and 2i+1 are θ + ερᵢdᵢ and θ − ερᵢdᵢ (the order `zo_write_probes` writes plus/minus ids)."""
    probes: list[Probe] = []
    for i, radius in enumerate(method.perturbation.radii(seeds)):
        scale = method.eps * radius
        probes += [Probe(((i, scale),)), Probe(((i, -scale),))]
    return tuple(probes)


def estimate(method: ZoMethod, seeds: StepSeeds, pair_losses: Sequence[float]) -> tuple[float, ...]:
    """cᵢ = wᵢ · (L⁺ᵢ − L⁻ᵢ) / 2ε / q from losses ordered as `two_point_probes`' slots.

    The difference is divided by ε, not ερᵢ: KerZOO's K(rᵢ) is built for that (E[r·K(r)] = 1).
    """
    plus, minus = list(pair_losses[0::2]), list(pair_losses[1::2])
    grads = mezo.projected_gradients(plus, minus, method.eps)
    coeffs = mezo.update_coefficients(grads)
    return tuple(c * w for c, w in zip(coeffs, method.perturbation.weights(seeds), strict=True))


def _candidate(method: ZoMethod, coeffs: Sequence[float], lr: float, sign: float) -> Probe:
    """θ − lr·(sign·Σ cᵢdᵢ + wd·θ), the state SGD would produce (up to rounding) with coefficients sign·cᵢ."""
    terms = tuple((i, -lr * sign * c) for i, c in enumerate(coeffs))
    return Probe(terms, 1.0 - lr * method.weight_decay)


def next_probes(method: ZoMethod, seeds: StepSeeds, losses: Sequence[float], lr: float) -> tuple[Probe, ...] | None:
    """The next round of probe slots given every loss scored so far this step, or None when the step is done.

    Two-point methods have one round of 2q slots. ZO-SGD-Cons (ZO-Bench): round 1 is [θ, θ±ερᵢdᵢ …] (2q+1),
    round 2 the candidates [θ − lr·ĝ, θ + lr·ĝ] (2), so a step scores 2q + 3 states.
    """
    q = method.num_directions
    if not method.conservative:
        return two_point_probes(method, seeds) if not losses else None
    if not losses:
        return (Probe(), *two_point_probes(method, seeds))
    if len(losses) == 2 * q + 1:
        coeffs = estimate(method, seeds, losses[1:])
        return (_candidate(method, coeffs, lr, 1.0), _candidate(method, coeffs, lr, -1.0))
    return None


def conservative_choice(loss_theta: float, loss_descent: float, loss_ascent: float) -> int:
    """ZO-Bench's rule: +1 keeps θ − lr·ĝ, −1 takes θ + lr·ĝ, 0 keeps θ; ties as in their trainer."""
    if loss_descent > loss_theta:
        return 0 if loss_theta < loss_ascent else -1
    return 1 if loss_descent < loss_ascent else -1


def finish_step(method: ZoMethod, seeds: StepSeeds, losses: Sequence[float], lr: float) -> StepRecord:
    losses = tuple(float(x) for x in losses)
    q = method.num_directions
    if not method.conservative:
        if len(losses) != 2 * q:
            raise ValueError(f"losses: expected {2 * q} probe losses, got {len(losses)}")
        return StepRecord(seeds, losses, estimate(method, seeds, losses), float(lr))
    if len(losses) != 2 * q + 3:
        raise ValueError(f"losses: expected {2 * q + 3} probe losses (conservative), got {len(losses)}")
    coeffs = estimate(method, seeds, losses[1 : 2 * q + 1])
    choice = conservative_choice(losses[0], losses[-2], losses[-1])
    if choice == 0:  # lr 0 and zero coefficients: the SGD update leaves θ bit for bit
        return StepRecord(seeds, losses, tuple(0.0 for _ in coeffs), 0.0)
    return StepRecord(seeds, losses, tuple(choice * c for c in coeffs), float(lr))


def apply_record(method: ZoMethod, state: TrainState, layout: LoraLayout, record: StepRecord) -> None:
    method.optimiser.apply(state, layout, method.perturbation, record)


# ------------------------------------------------------------------------------------- probe tensors (worker)
def step_base(
    perturbation: Perturbation, theta: dict[str, torch.Tensor], layout: LoraLayout, seeds: StepSeeds
) -> dict[str, torch.Tensor]:
    """θ as the step probes it: θ itself, unless the perturbation starts some steps by moving θ.

    Optional `state_for_step(θ, layout, seeds)` (lozo-bank's window entry, `lozo_bank.py`) returns θ or a new
    dict, never writing θ; that method's optimiser applies the same move in place before its update.
    """
    enter = getattr(perturbation, "state_for_step", None)
    return theta if enter is None else enter(theta, layout, seeds)


def probe_values(
    theta: dict[str, torch.Tensor],
    layout: LoraLayout,
    perturbation: Perturbation,
    seeds: StepSeeds,
    probes: Sequence[Probe],
) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
    """Yield (spec, [value for each probe slot]) tensor by tensor: fresh tensors, θ is never written.

    For a ±ε term this is `base + scale * d`, bit for bit MeZO's `base ± eps * z`.
    """
    theta = step_base(perturbation, theta, layout, seeds)
    for spec, ds in perturbation.stream(layout, seeds):
        base = theta[spec.name]
        values = []
        for probe in probes:
            value = base if probe.theta_scale == 1.0 else base * probe.theta_scale
            for index, scale in probe.terms:
                value = value + scale * ds[index]  # [shape of spec], a new tensor
            values.append(base.clone() if value is base else value)
        yield spec, values


def materialise_probes(
    theta: dict[str, torch.Tensor],
    layout: LoraLayout,
    perturbation: Perturbation,
    seeds: StepSeeds,
    probes: Sequence[Probe],
) -> list[dict[str, torch.Tensor]]:
    """Whole probe states as θ-shaped dicts (reference loop and tests; the worker streams instead)."""
    states: list[dict[str, torch.Tensor]] = [{} for _ in probes]
    for spec, values in probe_values(theta, layout, perturbation, seeds, probes):
        for state, value in zip(states, values, strict=True):
            state[spec.name] = value
    return states


# ---------------------------------------------------------------------------- reference loop and replay
def init_state(method: ZoMethod, layout: LoraLayout, theta: dict[str, torch.Tensor]) -> TrainState:
    return TrainState({k: v.clone() for k, v in theta.items()}, method.optimiser.init_buffers(layout))


def reference_step(
    method: ZoMethod,
    state: TrainState,
    layout: LoraLayout,
    job_seed: int,
    step: int,
    lr: float,
    loss_fn: Callable[[dict[str, torch.Tensor]], float],
) -> StepRecord:
    """One whole step with an in-process loss: the same protocol the engine step loop runs."""
    seeds = method.perturbation.seeds_for_step(job_seed, step, method.num_directions)
    losses: tuple[float, ...] = ()
    while (probes := next_probes(method, seeds, losses, lr)) is not None:
        states = materialise_probes(state.theta, layout, method.perturbation, seeds, probes)
        losses += tuple(float(loss_fn(s)) for s in states)
    record = finish_step(method, seeds, losses, lr)
    apply_record(method, state, layout, record)
    return record


def replay(method: ZoMethod, state: TrainState, layout: LoraLayout, records: Sequence[StepRecord]) -> TrainState:
    """The state after `records`, starting from a copy of `state` (which is left untouched)."""
    out = state.clone()
    for record in records:
        apply_record(method, out, layout, record)
    return out
