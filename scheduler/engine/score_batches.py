"""Engine-core side of batched scoring: a whole chunk of scoring sequences in one utility call.

The service sends a chunk as one `zo_score_batch` utility call (engine/score_wire.py). This module, loaded in
vLLM's engine-core process with zoserve's scheduler (engine/step_gate_scheduler.py), turns the chunk into
ordinary vLLM requests (one per sequence, the same sampling parameters `AsyncLLM.generate` would have sent,
the state's cache salt, the probe priority), adds them to the scheduler, and answers the call with a
`concurrent.futures.Future` that vLLM's utility handling replies with once it is resolved (vLLM defers a
utility's reply until a returned future completes). The scheduler hands every step's outputs through
`take_outputs`, which keeps the batch requests' log-probs and removes their outputs, so the service's output
handler never sees them; the future is resolved when the last one has finished.

Everything else about these requests is vLLM's own: priority order, the step gate, KV and LoRA limits, chunked
prefill, preemption. `zo_abort_batch` aborts what is left of a batch (a cancelled ZO step) through vLLM's
`abort_requests` and resolves its future with None.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

from scheduler.engine.score_wire import ABORT_BATCH_METHOD, RUNNING_BATCHES_METHOD, SCORE_BATCH_METHOD, ScoreBatch
from scheduler.scoring import ScoringSequence

log = logging.getLogger(__name__)

_INSTALLED_MARK = "_zoserve_score_batches_installed"


@dataclass
class _Pending:
    future: Future
    sequences: tuple[ScoringSequence, ...]
    request_ids: list[str]
    rows: list[list[float] | None]
    prompt_rows: list[list[float]] = field(default_factory=list)  # prompt log-probs gathered so far, per sequence
    remaining: int = 0


class ScoreBatches:
    """The batches the engine core added itself, and which of the scheduler's requests answer which batch."""

    def __init__(self) -> None:
        self._batches: dict[str, _Pending] = {}
        self._owner: dict[str, tuple[str, int]] = {}  # request id -> (batch id, index in the batch)

    def __len__(self) -> int:
        return len(self._batches)

    @property
    def num_requests(self) -> int:
        return len(self._owner)

    def submit(self, engine_core, wire) -> Future:
        """Add the batch's requests to the engine core; the future resolves to one row of log-probs each."""
        batch = ScoreBatch.from_wire(wire)
        if batch.batch_id in self._batches:
            raise ValueError(f"score batch {batch.batch_id!r} is already running")
        model_config = engine_core.vllm_config.model_config
        _validate(batch, model_config.max_model_len, model_config.get_vocab_size())
        requests = [_engine_request(batch, i) for i in range(len(batch.sequences))]
        future: Future = Future()
        n = len(requests)
        pending = _Pending(future, batch.sequences, [r.request_id for r in requests], [None] * n, [[] for _ in range(n)], n)
        if n == 0:
            future.set_result([])
            return future
        self._batches[batch.batch_id] = pending
        for i, request in enumerate(requests):
            self._owner[request.request_id] = (batch.batch_id, i)
        try:
            for request in requests:
                engine_core.add_request(*engine_core.preprocess_add_request(request))
        except BaseException:
            self._forget(batch.batch_id)
            engine_core.abort_requests([r.request_id for r in requests])
            raise
        return future

    def abort(self, engine_core, batch_id: str) -> bool:
        """Abort what is left of a batch; False when it is not running (finished already, or never sent)."""
        pending = self._forget(batch_id)
        if pending is None:
            return False
        unfinished = [rid for rid, row in zip(pending.request_ids, pending.rows) if row is None]
        if unfinished:
            engine_core.abort_requests(unfinished)
        if not pending.future.done():
            pending.future.set_result(None)
        return True

    def take_outputs(self, outputs_by_client: dict) -> None:
        """Keep the batch requests' results from one step's `EngineCoreOutputs` and remove their outputs."""
        if not self._owner or not outputs_by_client:
            return
        for engine_outputs in outputs_by_client.values():
            kept = []
            for output in engine_outputs.outputs:
                owner = self._owner.get(output.request_id)
                if owner is None:
                    kept.append(output)
                else:
                    self._record(owner, output)
            if len(kept) != len(engine_outputs.outputs):
                engine_outputs.outputs = kept
            finished = engine_outputs.finished_requests
            if finished:
                engine_outputs.finished_requests = {r for r in finished if not r.startswith(_REQUEST_PREFIX)} or None

    # ----------------------------------------------------------------- internals
    def _record(self, owner: tuple[str, int], output) -> None:
        batch_id, index = owner
        pending = self._batches.get(batch_id)
        if pending is None:
            return
        sequence = pending.sequences[index]
        if output.new_prompt_logprobs_tensors is not None:
            pending.prompt_rows[index].extend(output.new_prompt_logprobs_tensors.logprobs[:, 0].tolist())
        if output.finish_reason is None:
            return
        scored = pending.prompt_rows[index]
        complete = output.new_logprobs is not None if sequence.candidate_ids else len(scored) == len(sequence.token_ids) - 1
        if not complete:  # aborted or failed inside vLLM: this batch fails, the engine goes on
            self._forget(batch_id)
            pending.future.set_exception(
                RuntimeError(f"score request {output.request_id} finished ({output.finish_reason}) without its log-probs")
            )
            return
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


def _engine_request(batch: ScoreBatch, index: int):
    """What `AsyncLLM.generate` would have sent for one sequence (binding.py's per-request path)."""
    from vllm import SamplingParams
    from vllm.lora.request import LoRARequest
    from vllm.v1.engine import EngineCoreRequest

    seq = batch.sequences[index]
    wanted = dict(logprob_token_ids=list(seq.candidate_ids)) if seq.candidate_ids else dict(prompt_logprobs=0)
    params = SamplingParams(max_tokens=1, temperature=0.0, detokenize=False, **wanted)
    lora = None if batch.lora is None else LoRARequest(batch.lora.name, batch.lora.int_id, batch.lora.path)
    request_id = f"{_REQUEST_PREFIX}{batch.batch_id}:{index}"
    return EngineCoreRequest(
        request_id=request_id,
        prompt_token_ids=list(seq.token_ids),
        mm_features=None,
        sampling_params=params,
        pooling_params=None,
        arrival_time=time.time(),
        lora_request=lora,
        cache_salt=batch.salt,
        data_parallel_rank=None,
        priority=batch.priority,
        external_req_id=request_id,
    )


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

    setattr(engine_core_cls, SCORE_BATCH_METHOD, zo_score_batch)
    setattr(engine_core_cls, ABORT_BATCH_METHOD, zo_abort_batch)
    setattr(engine_core_cls, RUNNING_BATCHES_METHOD, zo_score_batches_running)
    setattr(engine_core_cls, _INSTALLED_MARK, True)


def _batches_of(engine_core) -> ScoreBatches:
    batches = getattr(engine_core.scheduler, "score_batches", None)
    if batches is None:
        raise RuntimeError("batched scoring needs zoserve's scheduler (scheduler_cls) in the engine core")
    return batches
