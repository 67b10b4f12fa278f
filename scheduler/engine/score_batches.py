"""Engine-core side of batched scoring: a whole chunk of scoring sequences in one utility call.

The service sends a chunk as one `zo_score_batch` utility call (engine/score_wire.py). This module, loaded in
vLLM's engine-core process with zoserve's scheduler (engine/step_gate_scheduler.py), turns the chunk into
ordinary vLLM requests (one per sequence, the same sampling parameters `AsyncLLM.generate` would have sent,
the state's cache salt, the probe priority; built on a thread of its own while the main thread waits for the
forward), adds them to the scheduler, and answers the call with a
`concurrent.futures.Future` that vLLM's utility handling replies with once it is resolved (vLLM defers a
utility's reply until a returned future completes). The scheduler hands every step's outputs through
`take_outputs`, which keeps the batch requests' log-probs and removes their outputs, so the service's output
handler never sees them; the future is resolved when the last one has finished.

Everything else about these requests is vLLM's own: priority order, the step gate, KV and LoRA limits, chunked
prefill, preemption. `zo_abort_batch` aborts what is left of a batch (a cancelled ZO step) through vLLM's
`abort_requests` and resolves its future with None.
"""

from __future__ import annotations

import inspect
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

from vllm import SamplingParams
from vllm.lora.request import LoRARequest
from vllm.v1.engine import EngineCoreRequest, EngineCoreRequestType

from scheduler.engine.score_wire import (
    ABORT_BATCH_METHOD,
    RUNNING_BATCHES_METHOD,
    SCORE_BATCH_METHOD,
    ScoreBatch,
    batch_header,
)
from scheduler.scoring import ScoringSequence

_INSTALLED_MARK = "_zoserve_score_batches_installed"


@dataclass
class _Pending:
    future: Future
    request_ids: list[str]
    rows: list[list[float] | None]
    prompt_rows: list[list[float]] = field(default_factory=list)  # prompt log-probs gathered so far, per sequence
    remaining: int = 0
    sequences: tuple[ScoringSequence, ...] | None = None  # set once built and added to the scheduler

    @property
    def in_scheduler(self) -> bool:
        return self.sequences is not None

    def unfinished(self) -> list[str]:
        """The batch's requests with no result yet."""
        return [rid for rid, row in zip(self.request_ids, self.rows) if row is None]


class ScoreBatches:
    """The batches the engine core added itself, and which of the scheduler's requests answer which batch.

    The engine core's main thread runs the whole step loop (schedule, wait for the forward, update) and every
    utility call in between, so whatever a utility call costs lengthens the step users wait on. `submit` (a
    utility call) therefore only registers the batch; a builder thread parses it, checks it and builds vLLM's
    `Request`s while the main thread waits on the worker (as vLLM's own input thread does for ordinary
    requests), then wakes the loop; the scheduler adds the built requests at its next `has_requests` or
    `schedule` (`add_built`). Every dict here is touched by the main thread only; the builder hands over
    through a deque.
    """

    def __init__(self, build_in_thread: bool = True) -> None:
        self._batches: dict[str, _Pending] = {}
        self._owner: dict[str, tuple[str, int]] = {}  # request id -> (batch id, index in the batch)
        self._built: deque[tuple[str, object]] = deque()  # (batch id, (sequences, requests) or the error)
        self._builder = ThreadPoolExecutor(1, thread_name_prefix="zoserve-score-batches") if build_in_thread else None

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_requests(self) -> int:
        return len(self._owner)

    def submit(self, engine_core, wire) -> Future:
        """Register the batch and have its requests built; the future resolves to one row of log-probs each."""
        batch_id, n = batch_header(wire)
        if batch_id in self._batches:
            raise ValueError(f"score batch {batch_id!r} is already running")
        future: Future = Future()
        if n == 0:
            future.set_result([])
            return future
        request_ids = [_request_id(batch_id, i) for i in range(n)]
        self._batches[batch_id] = _Pending(future, request_ids, [None] * n, [[] for _ in range(n)], n)
        for i, rid in enumerate(request_ids):
            self._owner[rid] = (batch_id, i)
        if self._builder is None:
            self._build(engine_core, wire)
        else:
            self._builder.submit(self._build, engine_core, wire)
        return future

    def add_built(self, scheduler) -> None:
        """Main thread: add the requests of every batch built since the last call to `scheduler`."""
        while self._built:
            batch_id, built = self._built.popleft()
            pending = self._batches.get(batch_id)
            if pending is None:  # aborted while it was being built
                continue
            if isinstance(built, BaseException):
                self._forget(batch_id)
                pending.future.set_exception(built)
                continue
            pending.sequences, requests = built
            for request in requests:
                scheduler.add_request(request)

    def close(self) -> None:
        if self._builder is not None:
            self._builder.shutdown(wait=False, cancel_futures=True)

    def _build(self, engine_core, wire) -> None:
        """Builder thread (or the caller without one): parse, check, build; never touches the dicts."""
        try:
            batch = ScoreBatch.from_wire(wire)
            model_config = engine_core.vllm_config.model_config
            _validate(batch, model_config.max_model_len, model_config.get_vocab_size())
            requests = [engine_core.preprocess_add_request(r)[0] for r in _engine_requests(batch)]
            self._built.append((batch.batch_id, (batch.sequences, requests)))
        except BaseException as exc:  # the caller gets it through the batch's future
            self._built.append((wire[0], exc))
        wake = getattr(engine_core, "input_queue", None)  # the busy loop may be blocked waiting for input
        if wake is not None:
            wake.put_nowait((EngineCoreRequestType.WAKEUP, None))

    def abort(self, engine_core, batch_id: str) -> bool:
        """Abort what is left of a batch; False when it is not running (finished already, or never sent)."""
        pending = self._forget(batch_id)
        if pending is None:
            return False
        unfinished = pending.unfinished()
        if unfinished and pending.in_scheduler:
            engine_core.abort_requests(unfinished)
        if not pending.future.done():
            pending.future.set_result(None)
        return True

    def take_outputs(self, outputs_by_client: dict) -> list[str]:
        """Keep the batch requests' results from one step's `EngineCoreOutputs` and remove their outputs.
        Returns the requests the scheduler should abort: the rest of any batch that failed in this step."""
        to_abort: list[str] = []
        if not self._owner or not outputs_by_client:
            return to_abort
        for engine_outputs in outputs_by_client.values():
            kept = []
            for output in engine_outputs.outputs:
                owner = self._owner.get(output.request_id)
                if owner is None:
                    kept.append(output)
                else:
                    to_abort.extend(self._record(owner, output))
            if len(kept) != len(engine_outputs.outputs):
                engine_outputs.outputs = kept
            finished = engine_outputs.finished_requests
            if finished:
                engine_outputs.finished_requests = {r for r in finished if not r.startswith(_REQUEST_PREFIX)} or None
        return to_abort

    # ----------------------------------------------------------------- internals
    def _record(self, owner: tuple[str, int], output) -> list[str]:
        """Keep one output of a batch request; returns the batch's other unfinished requests when this one
        ended without its log-probs (the batch fails, and they can be aborted)."""
        batch_id, index = owner
        pending = self._batches.get(batch_id)
        if pending is None:
            return []
        sequence = pending.sequences[index]
        if output.new_prompt_logprobs_tensors is not None:
            pending.prompt_rows[index].extend(output.new_prompt_logprobs_tensors.logprobs[:, 0].tolist())
        if output.finish_reason is None:
            return []
        scored = pending.prompt_rows[index]
        complete = output.new_logprobs is not None if sequence.candidate_ids else len(scored) == len(sequence.token_ids) - 1
        if not complete:  # aborted or failed inside vLLM: this batch fails, the engine goes on
            self._forget(batch_id)
            pending.future.set_exception(
                RuntimeError(f"score request {output.request_id} finished ({output.finish_reason}) without its log-probs")
            )
            return [rid for rid in pending.unfinished() if rid != output.request_id]
        if sequence.candidate_ids:
            row = output.new_logprobs.logprobs[0]  # column 0: the sampled token; then the candidates in order
            pending.rows[index] = [float(x) for x in row[1 : 1 + len(sequence.candidate_ids)]]
        else:
            # Row r of the prompt log-probs scores prompt token r + 1 given the tokens before it.
            pending.rows[index] = [float(x) for x in scored[sequence.target_start - 1 :]]
        del self._owner[output.request_id]
        pending.remaining -= 1
        if pending.remaining == 0:
            del self._batches[batch_id]
            if not pending.future.done():
                pending.future.set_result(pending.rows)
        return []

    def _forget(self, batch_id: str) -> _Pending | None:
        pending = self._batches.pop(batch_id, None)
        if pending is not None:
            for rid in pending.request_ids:
                self._owner.pop(rid, None)
        return pending


_REQUEST_PREFIX = "zob:"


def _validate(batch: ScoreBatch, max_model_len: int, vocab_size: int) -> None:
    for i, seq in enumerate(batch.sequences):
        n = len(seq.token_ids)
        if not 1 <= n < max_model_len:
            raise ValueError(f"sequence {i} of batch {batch.batch_id!r} has {n} tokens; 1..{max_model_len - 1} fit")
        if min(seq.token_ids) < 0 or max(seq.token_ids) >= vocab_size:
            raise ValueError(f"sequence {i} of batch {batch.batch_id!r} has a token id outside 0..{vocab_size - 1}")
        if seq.candidate_ids:
            if min(seq.candidate_ids) < 0 or max(seq.candidate_ids) >= vocab_size:
                raise ValueError(f"sequence {i} of batch {batch.batch_id!r} has a candidate outside 0..{vocab_size - 1}")
        elif not 1 <= seq.target_start <= n:
            raise ValueError(f"sequence {i} of batch {batch.batch_id!r}: target_start {seq.target_start} not in 1..{n}")


def _request_id(batch_id: str, index: int) -> str:
    return f"{_REQUEST_PREFIX}{batch_id}:{index}"


def _engine_requests(batch: ScoreBatch) -> list[EngineCoreRequest]:
    """What `AsyncLLM.generate` would have sent for each sequence (binding.py's per-request path)."""
    lora = None if batch.lora is None else LoRARequest(batch.lora.name, batch.lora.int_id, batch.lora.path)
    now = time.time()
    requests = []
    for index, seq in enumerate(batch.sequences):
        wanted = dict(logprob_token_ids=list(seq.candidate_ids)) if seq.candidate_ids else dict(prompt_logprobs=0)
        request_id = _request_id(batch.batch_id, index)
        requests.append(
            EngineCoreRequest(
                request_id=request_id,
                prompt_token_ids=list(seq.token_ids),
                mm_features=None,
                sampling_params=SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **wanted),
                pooling_params=None,
                arrival_time=now,
                lora_request=lora,
                cache_salt=batch.salt,
                data_parallel_rank=None,
                priority=batch.priority,
                external_req_id=request_id,
            )
        )
    return requests


def install_engine_core_methods(engine_core_cls) -> None:
    """Give vLLM's engine core the batch utility methods; they find the batches on its scheduler."""
    if getattr(engine_core_cls, _INSTALLED_MARK, False):
        return

    def zo_score_batch(self, wire) -> Future:
        return _batches_of(self).submit(self, wire)

    def zo_abort_batch(self, batch_id: str) -> bool:
        return _batches_of(self).abort(self, batch_id)

    def zo_score_batches_running(self) -> tuple[int, int]:
        batches = _batches_of(self)
        return len(batches), batches.num_requests

    for method in (zo_score_batch, zo_abort_batch, zo_score_batches_running):
        # vLLM inspects a utility method's signature on every call; computed once here, that costs nothing.
        method.__signature__ = inspect.signature(method)
    setattr(engine_core_cls, SCORE_BATCH_METHOD, zo_score_batch)
    setattr(engine_core_cls, ABORT_BATCH_METHOD, zo_abort_batch)
    setattr(engine_core_cls, RUNNING_BATCHES_METHOD, zo_score_batches_running)
    setattr(engine_core_cls, _INSTALLED_MARK, True)


def _batches_of(engine_core) -> ScoreBatches:
    batches = getattr(engine_core.scheduler, "score_batches", None)
    if batches is None:
        raise RuntimeError("batched scoring needs zoserve's scheduler (scheduler_cls) in the engine core")
    return batches
