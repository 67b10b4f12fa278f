"""One ZO step through the engine, for any method of `scheduler.zo.methods`.

The worker writes each round's probe states into slots from seeds; the 2q·B (or more, for multi-round
methods) sequences of a round are submitted at probe priority, so the engine packs them into as few forwards
as it can next to user requests. Only seeds and scalars cross the process boundary.

With a `gate` (the co-scheduler's token admission), a round's sequences go in as chunks of about
`gate.chunk_tokens` tokens, interleaved across the probe slots, each chunk entering the engine when the
gate admits it. Without one (benchmarks, tests, the baseline comparison), every sequence goes in at once.

A round's probe states are written without waiting for the write to be answered before its scoring goes
in: the engine core takes every call from this process in the order it was sent and runs the worker's
writes between two engine steps, before it schedules anything sent after them, so the first chunks see the
new states and a round costs one wait for the step in flight instead of two.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import Protocol

from scheduler.aio import gather_or_cancel
from scheduler.engine.binding import PROBE_PRIORITY, EngineBinding
from scheduler.objectives import BatchScore, EncodedDataset
from scheduler.probe_eval import probe_batch_score
from scheduler.rewards import EncodedReward
from scheduler.sampling import batch_indices
from scheduler.zo.zo_step import StepRecord, StepSeeds, ZoMethod, finish_step, next_probes, probes_to_wire


class ChunkGate(Protocol):
    chunk_tokens: int

    def admit(self, num_tokens: int) -> AbstractAsyncContextManager[None]: ...


def chunked(sequences: Sequence, max_tokens: int) -> list[list[int]]:
    """Consecutive index groups of `sequences` holding at most `max_tokens` tokens each (at least one)."""
    groups: list[list[int]] = []
    current: list[int] = []
    num_tokens = 0
    for i, seq in enumerate(sequences):
        size = len(seq.token_ids)
        if current and num_tokens + size > max_tokens:
            groups.append(current)
            current, num_tokens = [], 0
        current.append(i)
        num_tokens += size
    if current:
        groups.append(current)
    return groups


async def score_round(
    binding: EngineBinding,
    sequences: Sequence,
    slots: Sequence[int],
    salts: Sequence[str],
    priority: int,
    gate: ChunkGate | None,
) -> list[list]:
    """Scores of every sequence under each slot's state: one list per slot, in sequence order."""
    if gate is None:
        return await gather_or_cancel(
            binding.score(sequences, slot, salt=salt, priority=priority) for slot, salt in zip(slots, salts)
        )
    groups = chunked(sequences, gate.chunk_tokens)

    async def one_chunk(slot: int, salt: str, indices: list[int]) -> list:
        chunk = [sequences[i] for i in indices]
        async with gate.admit(sum(len(seq.token_ids) for seq in chunk)):
            return await binding.score(chunk, slot, salt=salt, priority=priority)

    # Chunk-major order: the + and − probes of a direction advance together, so the step finishes as one.
    jobs = [(j, group) for group in groups for j in range(len(slots))]
    results = await gather_or_cancel(one_chunk(slots[j], salts[j], group) for j, group in jobs)
    per_slot: list[list] = [[] for _ in slots]
    for (j, _), scores in zip(jobs, results):
        per_slot[j].extend(scores)
    return per_slot


def work_tokens(data: EncodedDataset | EncodedReward, sequences: Sequence) -> int:
    """Engine tokens of one pass over `sequences`: the prompts, plus for generated-then-matched data the tokens
    each sequence may generate (its `max_new_tokens`: an upper bound, the unit the budget and shares count)."""
    generated = data.max_new_tokens * len(sequences) if isinstance(data, EncodedReward) else 0
    return sum(len(seq.token_ids) for seq in sequences) + generated


async def score_batches(
    binding: EngineBinding,
    data: EncodedDataset | EncodedReward,
    indices: Sequence[int],
    sequences: Sequence,
    slots: Sequence[int],
    salts: Sequence[str],
    priority: int,
    gate: ChunkGate | None,
) -> list[BatchScore]:
    """The minibatch `indices` (whose sequences are `sequences`) under each slot's state, through the gate.

    Scored data goes in as chunks (`score_round`); generated-then-matched data enters as one chunk, since
    generation lengths are not known up front. Steps and evaluations both come here.
    """
    if isinstance(data, EncodedReward):
        num_tokens = len(slots) * work_tokens(data, sequences)
        async with gate.admit(num_tokens) if gate is not None else contextlib.nullcontext():
            return await gather_or_cancel(
                probe_batch_score(binding, data, indices, sequences, slot, salt=salt, priority=priority)
                for slot, salt in zip(slots, salts)
            )
    per_slot = await score_round(binding, sequences, slots, salts, priority, gate)
    return [data.score_batch(indices, scores) for scores in per_slot]


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
    data: EncodedDataset | EncodedReward,
    sequences: Sequence,
    losses: tuple[float, ...],
    record: StepRecord,
    num_sequences: int,
    started: float,
) -> StepOutcome:
    """The outcome record of a finished step; the engine path and the baseline loop report alike."""
    pairs = two_point_losses(losses, method)
    tokens_per_group = work_tokens(data, sequences)
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
    gate: ChunkGate | None = None,
    apply: bool = True,
) -> StepOutcome:
    """One step of `key`: scored, then applied to the worker's master state. With `apply=False` the update
    (`EngineBinding.apply_step` from the outcome) is left to the caller: the job loop sends it together with
    the serving buffer's write (`AdapterHost.apply_and_commit`)."""
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
        round_index = len(losses)
        salts = [f"{salt}:{step}:{round_index + j}" for j in range(len(round_slots))]
        # In this order: the write is sent before any chunk (gather_or_cancel starts its tasks in order, and
        # an engine call is sent before its task first yields), so the engine runs it before their steps.
        _, results = await gather_or_cancel([
            binding.write_probes(key, step, seeds.as_tuple(), probes_to_wire(probes), round_slots),
            score_batches(binding, data, batch, sequences, round_slots, salts, priority, gate),
        ])
        losses += tuple(result.loss for result in results)
        num_sequences += len(round_slots) * len(sequences)
    record = finish_step(method, seeds, losses, lr)
    if apply:  # before the outcome, so that its duration counts the update
        await binding.apply_step(key, step, seeds.as_tuple(), record.coeffs, record.lr)
    return step_outcome(
        method, step=step, seeds=seeds, batch=batch, data=data, sequences=sequences, losses=losses,
        record=record, num_sequences=num_sequences, started=started,
    )
