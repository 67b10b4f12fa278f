"""One ZO step through the engine, for any method of `scheduler.zo.methods`.

The worker writes each round's probe states into slots from seeds; the 2q·B (or more, for multi-round
methods) sequences of a round are submitted together at probe priority, so the engine packs them into as few
forwards as it can next to user requests. Only seeds and scalars cross the process boundary.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.engine.binding import PROBE_PRIORITY, EngineBinding
from scheduler.objectives import EncodedDataset
from scheduler.probe_eval import probe_batch_score
from scheduler.rewards import EncodedReward
from scheduler.sampling import batch_indices
from scheduler.zo.zo_step import StepRecord, StepSeeds, ZoMethod, finish_step, next_probes, probes_to_wire


@dataclass(frozen=True)
class StepOutcome:
    step: int  # 0-based step of the job; the state after it is one version later
    seeds: tuple[int, ...]  # StepSeeds.as_tuple()
    batch: tuple[int, ...]
    losses: tuple[float, ...]  # every probe loss, in probe order, round after round
    loss: float  # mean of the two-point probe losses (≈ the loss at θ)
    projected_grads: tuple[float, ...]  # (L⁺ᵢ − L⁻ᵢ) / 2ε per direction
    coeffs: tuple[float, ...]
    lr: float
    num_sequences: int
    num_tokens: int
    duration_s: float

    @property
    def projected_grad_norm(self) -> float:
        return math.sqrt(sum(g * g for g in self.projected_grads))


def step_outcome(
    method: ZoMethod,
    *,
    step: int,
    seeds: StepSeeds,
    batch: Sequence[int],
    sequences: Sequence,
    losses: tuple[float, ...],
    record: StepRecord,
    num_sequences: int,
    started: float,
) -> StepOutcome:
    """The outcome record of a finished step; the engine path and the baseline loop report alike."""
    pairs = two_point_losses(losses, method)
    tokens_per_group = sum(len(s.token_ids) for s in sequences)
    return StepOutcome(
        step=step,
        seeds=seeds.as_tuple(),
        batch=tuple(batch),
        losses=losses,
        loss=sum(pairs) / len(pairs),
        projected_grads=pair_grads(pairs, method.eps),
        coeffs=record.coeffs,
        lr=record.lr,
        num_sequences=num_sequences,
        num_tokens=num_sequences // max(1, len(sequences)) * tokens_per_group,
        duration_s=time.perf_counter() - started,
    )


def two_point_losses(losses: Sequence[float], method: ZoMethod) -> Sequence[float]:
    """The ± pair losses of a step (ZO-SGD-Cons scores θ first)."""
    offset = 1 if method.conservative else 0
    return losses[offset : offset + 2 * method.num_directions]


def pair_grads(pairs: Sequence[float], eps: float) -> tuple[float, ...]:
    return tuple((pairs[2 * i] - pairs[2 * i + 1]) / (2 * eps) for i in range(len(pairs) // 2))


async def run_engine_step(
    binding: EngineBinding,
    key: str,
    data: EncodedDataset | EncodedReward,
    method: ZoMethod,
    lr: float,
    *,
    job_seed: int,
    step: int,
    batch_size: int,
    slots: Sequence[int],
    salt: str,
    priority: int = PROBE_PRIORITY,
) -> StepOutcome:
    started = time.perf_counter()
    batch = batch_indices(job_seed, step, batch_size, len(data))
    seeds = method.perturbation.seeds_for_step(job_seed, step, method.num_directions)
    sequences = data.sequences(batch)
    losses: tuple[float, ...] = ()
    num_sequences = 0
    while (probes := next_probes(method, seeds, losses, lr)) is not None:
        if len(probes) > len(slots):
            raise ValueError(f"{method.name} needs {len(probes)} probe slots, {len(slots)} given")
        round_slots = list(slots[: len(probes)])
        await binding.write_probes(key, step, seeds.as_tuple(), probes_to_wire(probes), round_slots)
        round_index = len(losses)
        results = await asyncio.gather(
            *(
                probe_batch_score(binding, data, batch, sequences, slot, salt=f"{salt}:{step}:{round_index + j}", priority=priority)
                for j, slot in enumerate(round_slots)
            )
        )
        losses += tuple(result.loss for result in results)
        num_sequences += len(round_slots) * len(sequences)
    record = finish_step(method, seeds, losses, lr)
    await binding.apply_step(key, step, seeds.as_tuple(), record.coeffs, record.lr)
    return step_outcome(
        method, step=step, seeds=seeds, batch=batch, sequences=sequences, losses=losses, record=record,
        num_sequences=num_sequences, started=started,
    )
