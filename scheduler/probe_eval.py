"""How a probe slot's minibatch becomes a `BatchScore`: scored log-likelihoods, or generated-and-matched text.

Which path runs follows from the encoded dataset's type, so every ZO method works with every objective
through the same `finish_step`. Job evaluation calls `probe_batch_score` for any dataset; the step loop
calls it per probe slot for reward data (scoring data goes through its chunked `score_round` instead). Both
paths submit their sequences at once at the caller's priority, with a `cache_salt` naming the state.
"""

from __future__ import annotations

from collections.abc import Sequence

from scheduler.aio import gather_or_cancel
from scheduler.engine.binding import PROBE_PRIORITY, EngineBinding
from scheduler.objectives import BatchScore, EncodedDataset
from scheduler.rewards import EncodedReward
from scheduler.scoring import ScoringSequence


async def greedy_generations(
    binding: EngineBinding, data: EncodedReward, indices: Sequence[int], slot: int | None, salt: str,
    priority: int = PROBE_PRIORITY,
) -> list[str]:
    """The greedy generation for each example under the state in `slot`, all requests submitted together."""

    async def one(i: int) -> str:
        text = ""
        async for chunk in binding.generate(
            data.prompts[i], max_tokens=data.max_new_tokens, temperature=0.0, top_p=1.0, seed=None,
            stop=data.stop, slot=slot, salt=salt, priority=priority,
        ):
            text = chunk.text  # cumulative
        return text

    return await gather_or_cancel(one(i) for i in indices)


async def probe_batch_score(
    binding: EngineBinding,
    data: EncodedDataset | EncodedReward,
    indices: Sequence[int],
    sequences: Sequence[ScoringSequence],
    slot: int | None,
    *,
    salt: str,
    priority: int = PROBE_PRIORITY,
) -> BatchScore:
    """The minibatch `indices` (whose scoring sequences are `sequences`) under the state in `slot`."""
    if isinstance(data, EncodedReward):
        return data.reward_batch(indices, await greedy_generations(binding, data, indices, slot, salt, priority))
    scores = await binding.score(sequences, slot, salt=salt, priority=priority)
    return data.score_batch(indices, scores)
