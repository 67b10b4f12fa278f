"""vLLM's real scheduler with the step gate in front of it, driven step by step in this process (no engine).

Each test builds the scheduler class vLLM would load from `EngineConfig.engine_kwargs()`, queues requests,
and reads what `schedule()` puts into each forward. `update_from_output` is not called: a scheduled prefill
advances `num_computed_tokens` inside `schedule()`, which is all the gate reads.
"""

from __future__ import annotations

import importlib
import itertools

import torch

from vllm.config import CacheConfig, LoRAConfig, ModelConfig, SchedulerConfig, VllmConfig
from vllm.sampling_params import SamplingParams
from vllm.v1.core.sched.output import SchedulerOutput
from vllm.v1.kv_cache_interface import FullAttentionSpec, KVCacheConfig, KVCacheGroupSpec
from vllm.v1.request import Request

from scheduler.engine.config import PROBE_PRIORITY, USER_PRIORITY, EngineConfig
from scheduler.planning.step_gate import StepGateConfig

BLOCK = 32
PROMPT = 40  # tokens per probe or user prompt


def make_scheduler(
    model_dir: str,
    gate: StepGateConfig | None,
    max_num_batched_tokens: int = 2048,
    async_scheduling=False,
    batched_scoring: bool = True,
):
    engine = EngineConfig(
        model=model_dir, step_gate=gate, max_num_batched_tokens=max_num_batched_tokens, batched_scoring=batched_scoring
    )
    kwargs = engine.engine_kwargs()
    vllm_config = VllmConfig(
        model_config=ModelConfig(model=model_dir, dtype="float32", max_model_len=512),
        cache_config=CacheConfig(block_size=BLOCK, enable_prefix_caching=False),
        scheduler_config=SchedulerConfig(
            max_num_seqs=256,
            max_num_batched_tokens=max_num_batched_tokens,
            max_model_len=512,
            policy="priority",
            is_encoder_decoder=False,
            **({"scheduler_cls": kwargs["scheduler_cls"]} if "scheduler_cls" in kwargs else {}),
        ),
        lora_config=LoRAConfig(max_loras=4, max_lora_rank=8),
        additional_config=kwargs.get("additional_config", {}),
    )
    vllm_config.cache_config.num_gpu_blocks = 4096
    kv_cache_config = KVCacheConfig(
        num_blocks=4096,
        kv_cache_tensors=[],
        kv_cache_groups=[
            KVCacheGroupSpec(["layer"], FullAttentionSpec(block_size=BLOCK, num_kv_heads=1, head_size=8, dtype=torch.float32))
        ],
    )
    # The CPU platform turns async scheduling off; set it afterwards to build what vLLM would on a GPU.
    vllm_config.scheduler_config.async_scheduling = async_scheduling
    cls = vllm_config.scheduler_config.get_scheduler_cls()
    from vllm.v1.structured_output import StructuredOutputManager

    return cls(
        vllm_config=vllm_config,
        kv_cache_config=kv_cache_config,
        structured_output_manager=StructuredOutputManager(vllm_config),
        block_size=BLOCK,
    )


_ids = itertools.count()


def add(scheduler, priority: int, prompt_len: int = PROMPT, max_tokens: int = 1, arrival: float | None = None) -> str:
    n = next(_ids)
    request_id = f"{'user' if priority < PROBE_PRIORITY else 'probe'}-{n}"
    scheduler.add_request(
        Request(
            request_id=request_id,
            prompt_token_ids=[(n * 7 + i) % 900 + 4 for i in range(prompt_len)],  # distinct: no prefix hits
            sampling_params=SamplingParams(max_tokens=max_tokens),
            pooling_params=None,
            arrival_time=float(n) if arrival is None else arrival,
            priority=priority,
        )
    )
    return request_id


def tokens_by_class(output: SchedulerOutput) -> tuple[int, int]:
    users = sum(n for rid, n in output.num_scheduled_tokens.items() if rid.startswith("user"))
    probes = sum(n for rid, n in output.num_scheduled_tokens.items() if rid.startswith("probe"))
    return users, probes


GATE = StepGateConfig(probe_priority=PROBE_PRIORITY, tokens_with_users=128, tokens_with_user_prefill=0, user_memory_s=60.0)


def test_engine_config_names_a_loadable_scheduler(opt_model_dir):
    kwargs = EngineConfig(model=opt_model_dir, step_gate=GATE).engine_kwargs()
    module, _, name = kwargs["scheduler_cls"].rpartition(".")
    factory = getattr(importlib.import_module(module), name)
    assert callable(factory)
    # Batched scoring needs zoserve's scheduler even without a gate; with neither, vLLM's own runs.
    assert EngineConfig(model=opt_model_dir).engine_kwargs()["scheduler_cls"] == kwargs["scheduler_cls"]
    assert "scheduler_cls" not in EngineConfig(model=opt_model_dir, batched_scoring=False).engine_kwargs()


def test_without_gate_settings_zoserves_scheduler_schedules_as_vllm_does(opt_model_dir):
    ungated = make_scheduler(opt_model_dir, None)
    stock = make_scheduler(opt_model_dir, None, batched_scoring=False)
    assert ungated.step_gate is None and hasattr(ungated, "score_batches")
    assert not hasattr(stock, "score_batches")
    for scheduler in (ungated, stock):
        for _ in range(30):
            add(scheduler, PROBE_PRIORITY)
        add(scheduler, USER_PRIORITY, max_tokens=16, arrival=1e9)
    assert tokens_by_class(ungated.schedule()) == tokens_by_class(stock.schedule()) == (PROMPT, 30 * PROMPT)


def test_the_gate_keeps_vllms_async_scheduler_when_vllm_chose_it(opt_model_dir):
    from vllm.v1.core.sched.async_scheduler import AsyncScheduler

    assert not isinstance(make_scheduler(opt_model_dir, GATE), AsyncScheduler)
    gated = make_scheduler(opt_model_dir, GATE, async_scheduling=True)
    assert isinstance(gated, AsyncScheduler) and gated.step_gate == GATE
    for _ in range(30):
        add(gated, PROBE_PRIORITY)
    user = add(gated, USER_PRIORITY, max_tokens=16, arrival=1e9)
    assert gated.schedule().num_scheduled_tokens == {user: PROMPT}
    assert tokens_by_class(gated.schedule())[1] == 3 * PROMPT


def test_without_users_probes_fill_the_forward(opt_model_dir):
    scheduler = make_scheduler(opt_model_dir, GATE)
    for _ in range(30):
        add(scheduler, PROBE_PRIORITY)
    users, probes = tokens_by_class(scheduler.schedule())
    assert (users, probes) == (0, 30 * PROMPT)
    assert scheduler.num_probes_held_back == 0


def test_a_users_prefill_runs_without_probes_then_probes_are_capped(opt_model_dir):
    scheduler = make_scheduler(opt_model_dir, GATE)
    for _ in range(30):
        add(scheduler, PROBE_PRIORITY)
    user = add(scheduler, USER_PRIORITY, max_tokens=16, arrival=1e9)  # arrives last, still goes first
    first = scheduler.schedule()
    assert first.num_scheduled_tokens == {user: PROMPT}  # the user's prefill: no probe joins it
    assert len(scheduler.waiting) == 30  # every probe is back in the queue
    second = scheduler.schedule()  # the user runs (its output is not fed back here, so it has nothing to compute)
    users, probes = tokens_by_class(second)
    assert probes == 3 * PROMPT  # whole probes up to 128 tokens: 3 x 40
    assert len(scheduler.waiting) == 27


def test_stock_scheduler_packs_probes_with_the_users_prefill(opt_model_dir):
    """The behaviour the gate exists to change; if vLLM changed it, this test says so."""
    scheduler = make_scheduler(opt_model_dir, None, batched_scoring=False)
    for _ in range(30):
        add(scheduler, PROBE_PRIORITY)
    user = add(scheduler, USER_PRIORITY, max_tokens=16, arrival=1e9)
    output = scheduler.schedule()
    assert output.num_scheduled_tokens[user] == PROMPT
    assert tokens_by_class(output)[1] == 30 * PROMPT


def test_user_memory_keeps_the_cap_after_users_leave(opt_model_dir):
    scheduler = make_scheduler(opt_model_dir, GATE)
    user = add(scheduler, USER_PRIORITY, max_tokens=1)
    scheduler.schedule()
    scheduler.finish_requests(user, finished_status=_finished())
    for _ in range(10):
        add(scheduler, PROBE_PRIORITY)
    assert tokens_by_class(scheduler.schedule()) == (0, 3 * PROMPT)  # within user_memory_s: capped

    forgetful = make_scheduler(opt_model_dir, StepGateConfig(probe_priority=PROBE_PRIORITY, user_memory_s=0.0))
    user = add(forgetful, USER_PRIORITY, max_tokens=1)
    forgetful.schedule()
    forgetful.finish_requests(user, finished_status=_finished())
    for _ in range(10):
        add(forgetful, PROBE_PRIORITY)
    assert tokens_by_class(forgetful.schedule()) == (0, 10 * PROMPT)


def test_held_back_probes_keep_their_order_and_all_run(opt_model_dir):
    scheduler = make_scheduler(opt_model_dir, GATE)
    probes = [add(scheduler, PROBE_PRIORITY) for _ in range(12)]
    add(scheduler, USER_PRIORITY, max_tokens=64, arrival=1e9)
    order = []
    for _ in range(10):
        output = scheduler.schedule()
        order += [r.req_id for r in output.scheduled_new_reqs if r.req_id.startswith("probe")]
    assert order == probes  # oldest first, none lost, none twice


def test_an_oversized_probe_is_admitted_alone(opt_model_dir):
    scheduler = make_scheduler(opt_model_dir, GATE)
    user = add(scheduler, USER_PRIORITY, max_tokens=16)
    scheduler.schedule()  # the user's prefill
    big = add(scheduler, PROBE_PRIORITY, prompt_len=300)
    add(scheduler, PROBE_PRIORITY)
    output = scheduler.schedule()
    assert output.num_scheduled_tokens.get(big) == 300
    assert set(output.num_scheduled_tokens) == {big}  # the 40-token probe waits: the step is full
    assert user in scheduler.requests


def _finished():
    from vllm.v1.request import RequestStatus

    return RequestStatus.FINISHED_ABORTED


def test_the_cap_word_lowers_the_limit_with_users_between_steps(opt_model_dir, tmp_path):
    """The service's controller writes the shared cap; the scheduler applies it from the next step on."""
    from dataclasses import replace

    from scheduler.engine.gate_cap import GateCap

    cap = GateCap.create(tmp_path / "cap")
    scheduler = make_scheduler(opt_model_dir, replace(GATE, cap_path=str(cap.path)))
    for _ in range(30):
        add(scheduler, PROBE_PRIORITY)
    add(scheduler, USER_PRIORITY, max_tokens=16, arrival=1e9)
    scheduler.schedule()  # the user's prefill, alone
    assert tokens_by_class(scheduler.schedule())[1] == 3 * PROMPT  # nothing written: the static 128 holds
    cap.write(PROMPT)
    assert tokens_by_class(scheduler.schedule())[1] == PROMPT
    cap.write(10_000)  # the cap only lowers the gate's limit, never raises it
    assert tokens_by_class(scheduler.schedule())[1] == 3 * PROMPT
    cap.close()
