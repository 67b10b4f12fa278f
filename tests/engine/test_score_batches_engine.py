"""Batched scoring through the real engine: the same numbers as one request per sequence, cancellation leaves
nothing behind in the engine core, bad sequences get a clear error and the engine goes on."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from scheduler.scoring import ScoringSequence


def distinct_sequences(n: int, length: int, **kind):
    return [ScoringSequence(tuple((i * 31 + j * 7) % 2000 + 4 for j in range(length)), **kind) for i in range(n)]


async def wait_for_running(engine, done, timeout_s: float = 5.0):
    """Poll the engine core's (batches, requests) until `done(running)` or the timeout; the last reading."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not done(running := await engine.score_batches_running()) and loop.time() < deadline:
        await asyncio.sleep(0.01)
    return running


async def test_a_batch_scores_what_one_request_per_sequence_scores(engine):
    sequences = distinct_sequences(6, 12, candidate_ids=(7, 9, 11)) + distinct_sequences(3, 20, target_start=4)
    assert engine.config.batched_scoring
    batched = await engine.score(sequences, None, salt="batch-vs-single-a")
    config = engine.config
    engine.config = dataclasses.replace(config, batched_scoring=False)
    try:
        single = await engine.score(sequences, None, salt="batch-vs-single-b")
    finally:
        engine.config = config
    assert [len(s.logprobs) for s in batched] == [3] * 6 + [16] * 3
    worst = max(abs(a - b) for x, y in zip(batched, single) for a, b in zip(x.logprobs, y.logprobs, strict=True))
    assert worst < 1e-5
    assert await engine.score_batches_running() == (0, 0)


async def test_a_cancelled_batch_leaves_nothing_in_the_engine_core(engine):
    sequences = distinct_sequences(400, 60, candidate_ids=(5,))
    task = asyncio.ensure_future(engine.score(sequences, None, salt="cancelled-batch"))
    # Some of its requests may finish before the first reading that sees the batch; any count will do.
    running = await wait_for_running(engine, lambda r: r[0] == 1)
    assert running[0] == 1 and 0 < running[1] <= 400, running  # in the engine core, not done yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await wait_for_running(engine, lambda r: r == (0, 0)) == (0, 0)
    again = await engine.score(sequences[:2], None, salt="after-cancel")
    assert len(again) == 2


async def test_bad_sequences_get_a_clear_error_and_the_engine_goes_on(engine):
    with pytest.raises(Exception, match="token id outside 0..2047"):
        await engine.score([ScoringSequence((4, 5, 99_999), candidate_ids=(6,))], None, salt="bad-token")
    too_long = ScoringSequence(tuple(range(4, 4 + engine.config.max_model_len)), candidate_ids=(6,))
    with pytest.raises(Exception, match=f"has {engine.config.max_model_len} tokens"):
        await engine.score([too_long], None, salt="too-long")
    assert await engine.score_batches_running() == (0, 0)
    assert len(await engine.score(distinct_sequences(2, 8, candidate_ids=(6,)), None, salt="still-fine")) == 2
