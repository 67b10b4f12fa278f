"""Probe scoring through the real engine takes its turns in the probe lane (one per batch: the batch is one
engine-core call); user generation never waits there."""

from __future__ import annotations

from scheduler.engine.config import USER_PRIORITY
from scheduler.scoring import ScoringSequence


async def test_probe_requests_take_lane_turns_and_user_requests_do_not(engine):
    lane = engine.probe_lane
    assert lane is not None  # on by default, as in the service
    before = lane.num_granted
    sequences = [ScoringSequence(tuple(range(4, 20 + i)), target_start=1) for i in range(5)]
    scores = await engine.score(sequences, None, salt="lane-test")
    assert lane.num_granted == before + 1  # the five sequences went as one batch
    assert [len(s.logprobs) for s in scores] == [len(seq.token_ids) - 1 for seq in sequences]

    user_scores = await engine.score(sequences[:2], None, salt="lane-test", priority=USER_PRIORITY)
    async for _ in engine.generate(
        range(4, 12), max_tokens=2, temperature=0.0, top_p=1.0, seed=None, stop=None, slot=None, salt="lane-user"
    ):
        pass
    assert lane.num_granted == before + 1
    assert user_scores[0].logprobs == scores[0].logprobs  # same engine, same state: the lane changes no numbers
    assert lane.num_waiting == 0
