"""One MeZO step through the engine: probes written on the worker, 2q·B sequences scored together, update.

Only seeds and scalars cross the process boundary. All 2q probe batches of a step are submitted at once, at
probe priority, so the engine packs them into as few forwards as it can, next to user requests.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass

from scheduler.engine.binding import PROBE_PRIORITY, EngineBinding
from scheduler.objectives import BatchScore, EncodedDataset
from scheduler.sampling import batch_indices
from scheduler.zo import mezo
from scheduler.zo.directions import derive_seeds


@dataclass(frozen=True)
class StepOutcome:
    step: int  # 0-based; the state after it is version step + 1
    seeds: tuple[int, ...]
    batch: tuple[int, ...]
    losses_plus: tuple[float, ...]
    losses_minus: tuple[float, ...]
    projected_grads: tuple[float, ...]
    coeffs: tuple[float, ...]
    num_sequences: int
    num_tokens: int
    duration_s: float

    @property
    def loss(self) -> float:
        values = self.losses_plus + self.losses_minus
        return sum(values) / len(values)


@dataclass(frozen=True)
class ProbeSlots:
    plus: tuple[int, ...]  # one slot per direction
    minus: tuple[int, ...]


async def run_mezo_step(
    binding: EngineBinding,
    key: str,
    data: EncodedDataset,
    hyper: mezo.MezoHyper,
    *,
    job_seed: int,
    step: int,
    batch_size: int,
    slots: ProbeSlots,
    salt: str,
    priority: int = PROBE_PRIORITY,
) -> StepOutcome:
    started = time.perf_counter()
    q = hyper.num_directions
    batch = batch_indices(job_seed, step, batch_size, len(data))
    seeds = derive_seeds(job_seed, step, q)
    await binding.write_probes(key, seeds, hyper.eps, slots.plus[:q], slots.minus[:q])
    sequences = data.sequences(batch)

    async def probe_loss(slot: int, tag: str) -> BatchScore:
        scores = await binding.score(sequences, slot, salt=f"{salt}:{step}:{tag}", priority=priority)
        return data.score_batch(batch, scores)

    results = await asyncio.gather(
        *(probe_loss(slots.plus[i], f"+{i}") for i in range(q)),
        *(probe_loss(slots.minus[i], f"-{i}") for i in range(q)),
    )
    losses_plus = tuple(r.loss for r in results[:q])
    losses_minus = tuple(r.loss for r in results[q:])
    grads = mezo.projected_gradients(losses_plus, losses_minus, hyper.eps)
    coeffs = mezo.update_coefficients(grads)
    await binding.apply_mezo_update(key, seeds, coeffs, hyper.lr, hyper.weight_decay)
    return StepOutcome(
        step=step,
        seeds=tuple(seeds),
        batch=tuple(batch),
        losses_plus=losses_plus,
        losses_minus=losses_minus,
        projected_grads=tuple(grads),
        coeffs=tuple(coeffs),
        num_sequences=2 * q * len(sequences),
        num_tokens=2 * q * sum(len(s.token_ids) for s in sequences),
        duration_s=time.perf_counter() - started,
    )
