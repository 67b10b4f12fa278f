"""The step trace from a real engine: the engine-core process writes one line per step with what the forward
carried and where its scheduling thread spent the step, and closes the file when the engine shuts down."""

from __future__ import annotations

import dataclasses
import time

import pytest

from scheduler.engine.binding import USER_PRIORITY, EngineBinding
from scheduler.engine.step_trace import TRACE_ENV, read_step_trace
from scheduler.scoring import ScoringSequence

SEQUENCES = [ScoringSequence(tuple((i * 31 + j * 7) % 2000 + 4 for j in range(18)), candidate_ids=(7, 9)) for i in range(6)]


async def test_a_real_engine_traces_its_steps_and_where_their_time_went(engine, tmp_path):
    config = dataclasses.replace(engine.config, num_slots=4)
    with pytest.MonkeyPatch.context() as env:
        env.setenv(TRACE_ENV, str(tmp_path / "steps" / "core"))  # the engine-core process reads it at spawn
        binding = await EngineBinding.start(config, tmp_path / "engine")
    try:
        started = time.time()  # the binding's start-up self-test ran steps of its own before this
        async for _ in binding.generate(
            [2, 100, 200, 300], max_tokens=8, temperature=0.0, top_p=1.0, seed=None, stop=None, slot=None,
            salt="trace", priority=USER_PRIORITY,
        ):
            pass
        await binding.score(SEQUENCES, None, salt="trace-probes")
    finally:
        binding.shutdown()
    (path,) = (tmp_path / "steps").glob("core.*.tsv")
    steps = [s for s in read_step_trace(path) if s.schedule_start_s >= started]
    assert sum(s.user_tokens for s in steps) == 4 + 7  # the prompt, then one token per decode step
    assert sum(s.probe_tokens for s in steps) == sum(len(s.token_ids) for s in SEQUENCES)
    for step in steps:
        span = step.update_end_s - step.schedule_start_s
        assert 0 < step.thread_cpu_s <= span + 0.002
        assert 0 <= step.runqueue_wait_s <= span + 0.002
        assert 0 <= step.gc_s <= span + 0.002
