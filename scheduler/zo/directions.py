"""Random directions z(seed) over a LoRA layout, drawn from a dedicated CPU generator.

A direction is never stored: it is regenerated from its seed wherever it is needed (probe writes on the
engine worker, the update, store replay, the baseline loop). Tensors are drawn in `layout.tensors` order,
one `randn` per tensor, so every consumer that streams over tensors sees the same values.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

from scheduler.zo.lora_layout import LoraLayout, TensorSpec


def stream_directions(
    layout: LoraLayout, seeds: Sequence[int]
) -> Iterator[tuple[TensorSpec, list[torch.Tensor]]]:
    """Yield (tensor spec, [z_i for each seed]) tensor by tensor, holding one tensor per seed at a time."""
    generators = [torch.Generator(device="cpu").manual_seed(int(seed)) for seed in seeds]
    for spec in layout.tensors:
        yield spec, [torch.randn(spec.shape, generator=g, dtype=torch.float32) for g in generators]


def direction(layout: LoraLayout, seed: int) -> dict[str, torch.Tensor]:
    """The whole direction z(seed) as a θ-shaped dict (tests and small adapters)."""
    return {spec.name: zs[0] for spec, zs in stream_directions(layout, [seed])}


def derive_seeds(job_seed: int, step: int, num_directions: int) -> list[int]:
    """Per-direction seeds of one step, a pure function of (job seed, step): same inputs, same trajectory."""
    seq = torch.Generator(device="cpu").manual_seed((job_seed * 1_000_003 + step) % (2**63))
    return [int(s) for s in torch.randint(0, 2**62, (num_directions,), generator=seq)]
