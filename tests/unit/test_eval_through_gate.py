"""A job's evaluation is probe work too: its scoring enters the engine through the co-scheduler's token gate."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

from scheduler.adapter_host import SlotPool
from scheduler.coscheduler import CoScheduler, CoSchedulerConfig
from scheduler.job_runner import _evaluate
from scheduler.objectives import BatchScore
from scheduler.scoring import ScoringSequence


class _Data:
    def __init__(self, num_examples: int, length: int):
        self._seqs = [ScoringSequence(tuple(range(length))) for _ in range(num_examples)]

    def __len__(self) -> int:
        return len(self._seqs)

    def sequences(self, indices):
        return [self._seqs[i] for i in indices]

    def score_batch(self, indices, scores) -> BatchScore:
        assert len(scores) == len(indices)
        return BatchScore(loss=0.5, num_correct=0, num_examples=len(indices))


class _Binding:
    def __init__(self, co: CoScheduler):
        self.co = co
        self.peak_tokens_in_flight = 0
        self.num_sequences_scored = 0

    async def write_state(self, name, slot):
        pass

    async def score(self, sequences, slot, salt, priority=0):
        self.peak_tokens_in_flight = max(self.peak_tokens_in_flight, self.co.snapshot().num_probe_tokens_in_flight)
        self.num_sequences_scored += len(sequences)
        await asyncio.sleep(0.001)
        return [None] * len(sequences)


async def test_eval_scoring_waits_for_waiting_users_and_stays_under_the_budget():
    pool = SlotPool((1, 2, 3, 4))
    co = CoScheduler(CoSchedulerConfig(target_ttft_ms=100.0, max_tokens_in_flight=400, chunk_tokens=100), pool, (1, 2, 3, 4), list)
    binding = _Binding(co)
    runtime = SimpleNamespace(coscheduler=co, binding=binding, observer=SimpleNamespace(on_eval=lambda *a: None))
    run = SimpleNamespace(id="job-a", spec=SimpleNamespace(weight=1.0, adapter="a"), step=0, eval_metrics=[],
                          event=lambda *a: None)
    adapter = SimpleNamespace(name="a", head=3)
    data = _Data(num_examples=200, length=10)  # 2000 tokens: five times the budget
    co.start()
    try:
        async with asyncio.timeout(20), co.user_request(10) as user:
            evaluation = asyncio.create_task(_evaluate(runtime, run, adapter, data))
            await asyncio.sleep(0.15)  # under the planner's max_hold_s (0.25 s), after which a hold gives way
            assert binding.num_sequences_scored == 0  # a user waits for its first token: no probe chunk enters
            user.first_token()
            metric = await evaluation
        assert binding.num_sequences_scored == 200 and metric.loss == 0.5 and metric.version == 3
        assert 0 < binding.peak_tokens_in_flight <= 400
        assert co.snapshot().num_probe_tokens_in_flight == 0 and pool.num_free == 4
    finally:
        await co.stop()
