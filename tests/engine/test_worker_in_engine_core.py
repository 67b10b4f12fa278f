"""The model in the engine-core process (vLLM's in-process executor) or in a worker process of its own: both
layouts start, score and generate what the session engine does, and run the OpenMP threads they were given.

Each layout gets an engine of its own here, on one thread, next to the session engine (the service's default).
"""

from __future__ import annotations

import dataclasses
import os

import psutil
import pytest

from scheduler.engine.binding import USER_PRIORITY, EngineBinding
from scheduler.scoring import ScoringSequence

SEQUENCES = [ScoringSequence(tuple((i * 37 + j * 11) % 2000 + 4 for j in range(14)), candidate_ids=(7, 9)) for i in range(5)]
PROMPT = [2, 100, 200, 300, 400]


async def _greedy(binding: EngineBinding) -> tuple[int, ...]:
    tokens: tuple[int, ...] = ()
    async for chunk in binding.generate(
        PROMPT, max_tokens=6, temperature=0.0, top_p=1.0, seed=None, stop=None, slot=None, salt="layout",
        priority=USER_PRIORITY,
    ):
        tokens = chunk.token_ids
    return tokens


def _vllm_children(before: set[int]) -> list[psutil.Process]:
    return [p for p in psutil.Process().children(recursive=True) if p.pid not in before and "VLLM" in p.name()]


@pytest.fixture(scope="module", params=[True, False], ids=["in-engine-core", "worker-process"])
async def layout_engine(request, engine, tmp_path_factory):
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    config = dataclasses.replace(engine.config, worker_in_engine_core=request.param, num_cpu_threads=1)
    with pytest.MonkeyPatch.context() as env:
        # The session engine's thread settings are in the environment; this engine starts from its own.
        env.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
        env.delenv("OMP_NUM_THREADS", raising=False)
        binding = await EngineBinding.start(config, tmp_path_factory.mktemp("layout"))
        yield binding, _vllm_children(before)
        binding.shutdown()


async def test_both_layouts_score_and_generate_the_same(engine, layout_engine):
    layout, _ = layout_engine
    here = await engine.score(SEQUENCES, None, salt="layout-a")
    there = await layout.score(SEQUENCES, None, salt="layout-b")
    worst = max(abs(a - b) for x, y in zip(here, there) for a, b in zip(x.logprobs, y.logprobs, strict=True))
    assert worst < 1e-5
    assert await _greedy(engine) == await _greedy(layout)


async def test_the_layout_decides_where_the_model_runs_and_on_how_many_threads(layout_engine):
    layout, children = layout_engine
    by_name = {p.name(): p.pid for p in children}
    pid, threads = await layout.model_process()
    if layout.config.worker_in_engine_core:
        assert sorted(by_name) == ["VLLM::EngineCore"], by_name
        assert pid == by_name["VLLM::EngineCore"]
    else:
        assert sorted(by_name) == ["VLLM::EngineCore", "VLLM::Worker"], by_name
        assert pid == by_name["VLLM::Worker"]
    # The thread count it was given, not one OpenMP thread per core spinning on the API process's core.
    assert threads == 1


async def test_both_layouts_run_zoserves_lora_ops_in_the_model_process(engine, layout_engine):
    layout, _ = layout_engine
    assert await layout.lora_ops() == ("grouped", "dense")
    assert await engine.lora_ops() == ("grouped", "dense")


async def test_both_layouts_run_the_vectorised_per_step_paths_in_the_model_process(engine, layout_engine):
    layout, _ = layout_engine
    assert await layout.fast_paths() == ("lora_mapping", "logprob_token_ids")
    assert await engine.fast_paths() == ("lora_mapping", "logprob_token_ids")


async def test_scores_are_the_same_with_vllms_own_per_step_paths(layout_engine):
    """bench/engine_mix.py --ab-fast-paths switches them off and on in the running engine: the scores of the
    same sequences over several slots do not move (the unit tests compare the functions on random inputs)."""
    layout, _ = layout_engine
    slots = layout.slot_ids[:3]
    try:
        assert await layout.fast_paths(False) == ()
        own = [await layout.score(SEQUENCES, slot, salt=f"own-{slot}") for slot in slots]
    finally:
        assert await layout.fast_paths(True) == ("lora_mapping", "logprob_token_ids")
    fast = [await layout.score(SEQUENCES, slot, salt=f"fast-{slot}") for slot in slots]
    worst = max(
        abs(a - b) for x, y in zip(fast, own) for p, q in zip(x, y) for a, b in zip(p.logprobs, q.logprobs, strict=True)
    )
    assert worst < 1e-6


def thread_nice_values(pid: int) -> set[int]:
    return {os.getpriority(os.PRIO_PROCESS, thread.id) for thread in psutil.Process(pid).threads()}


async def test_both_layouts_run_vllms_processes_nicer_than_the_api_process(engine, layout_engine):
    layout, children = layout_engine
    expected = min(19, os.getpriority(os.PRIO_PROCESS, 0) + layout.config.engine_nice_increment)
    assert layout.config.engine_nice_increment == 10
    for process in children:
        assert thread_nice_values(process.pid) == {expected}, process.name()
    session_pid, _ = await engine.model_process()
    assert thread_nice_values(session_pid) == {expected}
    own = os.getpriority(os.PRIO_PROCESS, 0)
    assert own < expected or own == 19, "the API process keeps its own priority"


async def test_the_model_process_gil_switch_interval_can_be_read_and_set(engine):
    """bench/engine_mix.py's A/B knob: the interval is the model process's, not this one's."""
    import sys

    default = await engine.switch_interval()
    try:
        assert await engine.switch_interval(0.0005) == pytest.approx(0.0005)
        assert await engine.switch_interval() == pytest.approx(0.0005)
        assert sys.getswitchinterval() == pytest.approx(0.005)
    finally:
        await engine.switch_interval(default)


async def test_freezing_the_heap_empties_the_model_process_old_generation(layout_engine):
    """What the service does once it is up: the objects start-up left behind (vLLM froze its own at engine
    start; the self-test, slots and modules loaded since are not) leave the old generation, which every full
    collection walks mid-step, so a later collection has next to nothing to walk."""
    layout, _ = layout_engine
    frozen_before, old_before = await layout.gc_counts()
    assert old_before > 1000  # start-up left work for every full collection
    frozen, old = await layout.freeze_heap()
    assert frozen >= frozen_before + old_before // 2
    assert old < 100
    await layout.score(SEQUENCES, None, salt="after-freeze")  # serving goes on as before
    assert (await layout.gc_counts())[1] < old_before // 4
