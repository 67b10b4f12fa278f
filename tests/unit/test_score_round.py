"""score_round through the co-scheduler's token gate: chunking, result order, and a failing chunk."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from scheduler.adapter_host import SlotPool
from scheduler.coscheduler import CoScheduler, CoSchedulerConfig
from scheduler.engine.binding import GenerationChunk
from scheduler.engine_step import chunked, score_batches, score_round, work_tokens
from scheduler.rewards import EncodedReward
from scheduler.scoring import ScoringSequence


def _seqs(*lengths: int) -> list[ScoringSequence]:
    return [ScoringSequence(tuple(range(n))) for n in lengths]


class _FakeBinding:
    """Scores a sequence as (slot, its length); `fail_slot` raises once that slot's first chunk is running."""

    def __init__(self, fail_slot: int | None = None):
        self.fail_slot = fail_slot
        self.running = 0
        self.cancelled = 0

    async def score(self, sequences, slot, salt, priority=0):
        self.running += 1
        try:
            await asyncio.sleep(0.01)
            if slot == self.fail_slot:
                raise RuntimeError("engine request failed")
            await asyncio.sleep(0.05)
            return [(slot, len(seq.token_ids)) for seq in sequences]
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        finally:
            self.running -= 1


def test_chunked_groups_consecutive_sequences_under_the_limit():
    assert chunked(_seqs(3, 3, 3, 9, 1), 6) == [[0, 1], [2], [3], [4]]
    assert chunked([], 6) == []


async def _with_coscheduler(body):
    pool = SlotPool((1, 2, 3, 4))
    co = CoScheduler(CoSchedulerConfig(target_ttft_ms=100.0, max_tokens_in_flight=20, chunk_tokens=6), pool, (1, 2, 3, 4), list)
    co.start()
    try:
        async with asyncio.timeout(10), co.step("job-a", 1.0, 60, 2) as lease:
            await body(co, lease)
        assert pool.num_free == 4
    finally:
        await co.stop()


async def test_score_round_returns_each_slots_scores_in_sequence_order():
    sequences = _seqs(3, 3, 3, 9, 1)

    async def body(co, lease):
        per_slot = await score_round(_FakeBinding(), sequences, lease.slot_ids, ["s0", "s1"], 0, lease.gate)
        assert per_slot == [[(slot, len(s.token_ids)) for s in sequences] for slot in lease.slot_ids]
        assert co.snapshot().num_probe_tokens_in_flight == 0

    await _with_coscheduler(body)


async def test_a_failing_chunk_cancels_its_siblings_before_the_step_ends():
    sequences = _seqs(*([3] * 20))  # 10 chunks per slot, far more than the 20-token budget holds

    async def body(co, lease):
        binding = _FakeBinding(fail_slot=lease.slot_ids[1])
        with pytest.raises(RuntimeError, match="engine request failed"):
            await score_round(binding, sequences, lease.slot_ids, ["s0", "s1"], 0, lease.gate)
        # Nothing of this step may still run on its slots or wait at the gate once the step gives them back.
        assert binding.running == 0 and binding.cancelled > 0
        snap = co.snapshot()
        assert snap.num_probe_tokens_in_flight == 0 and snap.num_chunks_waiting == 0

    await _with_coscheduler(body)


class _RecordingGate:
    chunk_tokens = 1000

    def __init__(self):
        self.admitted: list[int] = []

    def admit(self, num_tokens: int):
        self.admitted.append(num_tokens)
        return contextlib.nullcontext()


class _EchoGenerator:
    """Generates the reference answer "great" for every prompt."""

    async def generate(self, prompt_ids, *, max_tokens, **_):
        yield GenerationChunk((7,), " great", True, "stop", len(prompt_ids))


async def test_reward_rounds_count_the_tokens_they_may_generate():
    data = EncodedReward(prompts=((1, 2, 3), (4, 5)), references=(("great",), ("great",)), match="contains", max_new_tokens=4)
    indices = [0, 1]
    sequences = data.sequences(indices)
    assert work_tokens(data, sequences) == (3 + 4) + (2 + 4)
    gate = _RecordingGate()
    results = await score_batches(_EchoGenerator(), data, indices, sequences, [1, 2], ["a", "b"], 1, gate)
    assert [r.loss for r in results] == [0.0, 0.0]
    assert gate.admitted == [2 * 13]  # both probe slots' prompts and their generation budgets
