"""Minibatch order: a pure function of (job seed, step), identical for the engine path and the baseline."""

from __future__ import annotations

import random


def batch_indices(job_seed: int, step: int, batch_size: int, num_examples: int) -> list[int]:
    """Indices of step `step`'s minibatch: consecutive slices of per-epoch shuffles of range(num_examples)."""
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError("batch_size and num_examples must be positive")
    indices: list[int] = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_examples)
        order = list(range(num_examples))
        random.Random(f"zoserve-epoch:{job_seed}:{epoch}").shuffle(order)
        take = min(batch_size - len(indices), num_examples - offset)
        indices.extend(order[offset : offset + take])
        position += take
    return indices
