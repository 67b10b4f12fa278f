"""Minibatch order: a pure function of (job seed, step), identical for the engine path and the baseline."""

from __future__ import annotations

import functools
import random
from array import array

# Epoch orders kept: a job reads one epoch at a time (two across a boundary), so this covers several jobs.
_EPOCH_ORDERS_KEPT = 16


@functools.lru_cache(maxsize=_EPOCH_ORDERS_KEPT)
def _epoch_order(job_seed: int, epoch: int, num_examples: int) -> array:
    """Epoch `epoch`'s shuffle of range(num_examples), built once: shuffling SST-2's 67k training rows takes
    ~12 ms, which every step of a job would otherwise spend on the service's event loop."""
    order = list(range(num_examples))
    random.Random(f"zoserve-epoch:{job_seed}:{epoch}").shuffle(order)
    return array("l", order)


def batch_indices(job_seed: int, step: int, batch_size: int, num_examples: int) -> list[int]:
    """Indices of step `step`'s minibatch: consecutive slices of per-epoch shuffles of range(num_examples)."""
    if num_examples <= 0 or batch_size <= 0:
        raise ValueError("batch_size and num_examples must be positive")
    indices: list[int] = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, num_examples)
        order = _epoch_order(job_seed, epoch, num_examples)
        take = min(batch_size - len(indices), num_examples - offset)
        indices.extend(order[offset : offset + take])
        position += take
    return indices
