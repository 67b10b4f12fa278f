"""vLLM's scheduler with zoserve's per-step probe gate (planning/step_gate.py) in front of it.

Loaded by vLLM in the engine-core process through `scheduler_cls` (a stock vLLM setting), which names
`make_step_gate_scheduler`: it builds the gate on vLLM's `AsyncScheduler` when vLLM chose async scheduling
(GPU) and on the plain `Scheduler` otherwise (the CPU platform turns async scheduling off), so the gate never
costs vLLM its async mode. The gate's settings arrive in `additional_config["zoserve_step_gate"]` (EngineConfig
names this class only together with them). Before each `schedule()` the probes the gate does not admit are
taken out of the waiting queue and put back right after, so vLLM's own scheduling (priority order, KV and
LoRA limits, chunked prefill) decides everything else unchanged. Only never-scheduled waiting probes are held
back; running requests and requests holding KV blocks are left alone.

The same class carries batched scoring (engine/score_batches.py): the engine core's `zo_score_batch` utility
adds a chunk's scoring requests here, and `update_from_output` takes their results out of each step's outputs.
With batched scoring on and no gate settings, `schedule()` is vLLM's own.
"""

from __future__ import annotations

import time
from pathlib import Path

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.request_queue import PriorityRequestQueue
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from scheduler.engine.config import PROBE_PRIORITY, STEP_GATE_CONFIG_KEY
from scheduler.engine.gate_cap import GateCap
from scheduler.engine.score_batches import ScoreBatches, install_engine_core_methods
from scheduler.engine.step_trace import StepTracer
from scheduler.planning.step_gate import StepGateConfig, StepView, num_admitted, step_allowance


def _uncomputed(request) -> int:
    return max(0, request.num_tokens - request.num_computed_tokens)


def make_step_gate_scheduler(vllm_config, *args, **kwargs) -> Scheduler:
    base = AsyncStepGateScheduler if vllm_config.scheduler_config.async_scheduling else StepGateScheduler
    return base(vllm_config, *args, **kwargs)


class _StepGate:
    """Mixed in front of one of vLLM's schedulers; everything but `schedule()` and the outputs of batched
    scoring requests is theirs."""

    def __init__(self, vllm_config, *args, **kwargs) -> None:
        super().__init__(vllm_config, *args, **kwargs)
        extra = vllm_config.additional_config
        if not isinstance(extra, dict) or STEP_GATE_CONFIG_KEY not in extra:
            raise ValueError(f"zoserve's scheduler needs additional_config[{STEP_GATE_CONFIG_KEY!r}] (None: no gate)")
        values = extra[STEP_GATE_CONFIG_KEY]
        self.step_gate = StepGateConfig.from_dict(values) if values else None
        if self.step_gate is not None and not isinstance(self.waiting, PriorityRequestQueue):
            raise ValueError("the zoserve step gate needs scheduling_policy='priority'")
        self._last_user_seen_s: float | None = None
        self.num_probes_held_back = 0  # steps x probes, for tests and debugging
        probe_priority = self.step_gate.probe_priority if self.step_gate is not None else PROBE_PRIORITY
        self._tracer = StepTracer.from_env(probe_priority)  # ZOSERVE_STEP_TRACE: one line a step
        cap_path = self.step_gate.cap_path if self.step_gate is not None else None
        self._cap = GateCap.open(Path(cap_path)) if cap_path else None
        self.score_batches = ScoreBatches()
        from vllm.v1.engine.core import EngineCore

        install_engine_core_methods(EngineCore)

    def has_requests(self) -> bool:
        self.score_batches.add_built(self)
        return super().has_requests()

    def shutdown(self) -> None:
        self.score_batches.close()
        if self._tracer is not None:
            self._tracer.close()
        super().shutdown()

    def schedule(self, *args, **kwargs):
        self.score_batches.add_built(self)
        if self._tracer is None:
            return self._gated_schedule(*args, **kwargs)
        start_s = self._tracer.begin()
        output = self._gated_schedule(*args, **kwargs)
        self._tracer.scheduled(start_s, output, self.requests, self.waiting)
        return output

    def update_from_output(self, *args, **kwargs):
        start_s = time.time() if self._tracer is not None else 0.0
        outputs = super().update_from_output(*args, **kwargs)
        failed = self.score_batches.take_outputs(outputs)
        if failed:  # the rest of a batch that cannot be answered any more
            self.finish_requests(failed, RequestStatus.FINISHED_ABORTED)
        if self._tracer is not None:
            self._tracer.updated(start_s)
        return outputs

    def _gated_schedule(self, *args, **kwargs):
        if self.step_gate is None:
            return super().schedule(*args, **kwargs)
        allowance = self._step_allowance()
        if allowance is None:
            return super().schedule(*args, **kwargs)
        queue = self.waiting
        self.waiting = self._step_queue(queue, allowance)  # users + admitted probes; `queue` keeps the rest
        try:
            return super().schedule(*args, **kwargs)
        finally:
            step_queue, self.waiting = self.waiting, queue
            while step_queue:  # not scheduled this step (LoRA or KV limits), or preempted into the queue
                queue.add_request(step_queue.pop_request())

    def _step_allowance(self) -> int | None:
        probe_priority = self.step_gate.probe_priority
        num_user_running = 0
        probe_tokens_running = 0
        for request in self.running:
            if request.priority < probe_priority:
                num_user_running += 1
            else:
                probe_tokens_running += min(_uncomputed(request), request.num_prompt_tokens)
        user_waiting = bool(self.waiting) and self.waiting.peek_request().priority < probe_priority
        decision = step_allowance(
            self.step_gate,
            StepView(
                now_s=time.monotonic(),
                num_user_waiting=int(user_waiting),  # the gate only asks whether any user waits
                num_user_running=num_user_running,
                num_probe_tokens_running=probe_tokens_running,
                tokens_with_users_cap=self._cap.read() if self._cap is not None else None,
            ),
            self._last_user_seen_s,
        )
        self._last_user_seen_s = decision.last_user_seen_s
        return decision.allowance

    def _step_queue(self, queue: PriorityRequestQueue, allowance: int) -> PriorityRequestQueue:
        """Move the waiting users and the probes the gate admits out of `queue` (priority order) into a new one."""
        probe_priority = self.step_gate.probe_priority
        step_queue = PriorityRequestQueue()
        while queue and queue.peek_request().priority < probe_priority:
            step_queue.add_request(queue.pop_request())
        for _ in range(num_admitted(allowance, _queued_tokens(queue))):
            step_queue.add_request(queue.pop_request())
        self.num_probes_held_back += len(queue)
        return step_queue


class StepGateScheduler(_StepGate, Scheduler):
    pass


class AsyncStepGateScheduler(_StepGate, AsyncScheduler):
    pass


def _queued_tokens(queue: PriorityRequestQueue):
    """Uncomputed tokens of the queue's requests in priority order, without taking them out."""
    for request in queue:
        yield _uncomputed(request)
