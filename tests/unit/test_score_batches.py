"""Batched scoring on the engine-core side (engine/score_batches.py), driven with vLLM's own records and a
stand-in engine core that builds vLLM `Request`s the way the real one does."""

from __future__ import annotations

import queue
from concurrent.futures import Future
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from vllm.v1.engine import EngineCoreOutput, EngineCoreOutputs, EngineCoreRequestType, FinishReason
from vllm.v1.outputs import LogprobsLists, LogprobsTensors
from vllm.v1.request import Request

from scheduler.engine.config import PROBE_PRIORITY
from scheduler.engine.score_batches import ScoreBatches
from scheduler.engine.score_wire import ScoreBatch, SlotLora, scores_from_wire
from scheduler.scoring import ScoringSequence

VOCAB = 64


class FakeEngineCore:
    """What `ScoreBatches` uses of vLLM's EngineCore: its config, request preprocessing, abort and input queue;
    and of its scheduler, `add_request`."""

    def __init__(self, max_model_len: int = 32) -> None:
        model_config = SimpleNamespace(max_model_len=max_model_len, get_vocab_size=lambda: VOCAB)
        self.vllm_config = SimpleNamespace(model_config=model_config)
        self.added: list[Request] = []
        self.aborted: list[str] = []
        self.input_queue: queue.Queue = queue.Queue()

    def preprocess_add_request(self, request):
        return Request.from_engine_core_request(request, None), 0

    def add_request(self, request: Request) -> None:  # the scheduler's
        self.added.append(request)

    def abort_requests(self, request_ids) -> None:
        self.aborted.extend(request_ids)


def submitted(core: FakeEngineCore, batches: ScoreBatches, wire) -> Future:
    future = batches.submit(core, wire)
    batches.add_built(core)
    return future


def batch(batch_id: str, sequences, lora=SlotLora("zoslot-3", 3, "/zero"), salt="job:7", priority=PROBE_PRIORITY):
    return ScoreBatch(batch_id, lora, salt, priority, tuple(sequences)).to_wire()


def candidate_output(request_id: str, values) -> EngineCoreOutput:
    row = np.array([[values[0], *values]], dtype=np.float32)  # column 0: the sampled token
    ids = np.zeros_like(row, dtype=np.int32)
    return EngineCoreOutput(
        request_id, [5], new_logprobs=LogprobsLists(ids, row, np.zeros(1, dtype=np.int32)),
        finish_reason=FinishReason.LENGTH,
    )


def prompt_output(request_id: str, values, finished: bool) -> EngineCoreOutput:
    column = torch.tensor(values, dtype=torch.float32)[:, None]
    tensors = LogprobsTensors(torch.zeros_like(column, dtype=torch.int32), column, torch.zeros(len(values)))
    return EngineCoreOutput(
        request_id, [5] if finished else [], new_prompt_logprobs_tensors=tensors,
        finish_reason=FinishReason.LENGTH if finished else None,
    )


def user_output(request_id: str = "user-1") -> EngineCoreOutput:
    return EngineCoreOutput(request_id, [9])


def test_the_wire_round_trips_and_rejects_what_it_cannot_read():
    sequences = (ScoringSequence((1, 2, 3), candidate_ids=(4, 5)), ScoringSequence((6, 7, 8), target_start=1))
    original = ScoreBatch("b-1", SlotLora("zoslot-2", 2, "/zero"), "salt", PROBE_PRIORITY, sequences)
    assert ScoreBatch.from_wire(original.to_wire()) == original
    assert ScoreBatch.from_wire(ScoreBatch("b-2", None, "s", 0, ()).to_wire()).lora is None
    for wire in [("b",), ("", None, "s", 0, []), ("b", None, 3, 0, []), ("b", None, "s", "high", [])]:
        with pytest.raises(ValueError):
            ScoreBatch.from_wire(wire)
    with pytest.raises(RuntimeError, match="2 sequences came back with nothing"):
        scores_from_wire(None, 2)
    assert scores_from_wire([[1, 2], []], 2) == [(1.0, 2.0), ()]


def test_a_batch_becomes_vllm_requests_and_resolves_when_its_last_output_is_in():
    core, batches = FakeEngineCore(), ScoreBatches(build_in_thread=False)
    sequences = [ScoringSequence((1, 2, 3), candidate_ids=(7, 9)), ScoringSequence((1, 2, 3, 4), candidate_ids=(11,))]
    future = submitted(core, batches, batch("b1", sequences))
    assert isinstance(future, Future) and not future.done()
    first, second = core.added
    assert first.prompt_token_ids == [1, 2, 3] and first.priority == PROBE_PRIORITY and first.cache_salt == "job:7"
    assert first.lora_request.lora_int_id == 3 and first.lora_request.lora_name == "zoslot-3"
    assert first.sampling_params.logprob_token_ids == [7, 9] and first.sampling_params.max_tokens == 1
    assert (len(batches), batches.num_requests) == (1, 2)

    step = {0: EngineCoreOutputs(outputs=[user_output(), candidate_output(second.request_id, [-0.5])])}
    batches.take_outputs(step)
    assert [o.request_id for o in step[0].outputs] == ["user-1"]  # the batch's output never leaves the core
    assert not future.done()
    step = {0: EngineCoreOutputs(outputs=[candidate_output(first.request_id, [-1.0, -2.0])])}
    batches.take_outputs(step)
    assert step[0].outputs == []
    assert future.result() == [[-1.0, -2.0], [-0.5]]  # in the batch's order, not the order they finished
    assert (len(batches), batches.num_requests) == (0, 0)


def test_prompt_log_probs_gather_across_steps_and_start_at_the_target():
    core, batches = FakeEngineCore(), ScoreBatches(build_in_thread=False)
    future = submitted(core, batches, batch("b2", [ScoringSequence((1, 2, 3, 4, 5), target_start=3)], lora=None))
    (request,) = core.added
    assert request.lora_request is None and request.sampling_params.prompt_logprobs == 0
    batches.take_outputs({0: EngineCoreOutputs(outputs=[prompt_output(request.request_id, [-1.0, -2.0], False)])})
    assert not future.done()
    batches.take_outputs({0: EngineCoreOutputs(outputs=[prompt_output(request.request_id, [-3.0, -4.0], True)])})
    # Row r scores prompt token r + 1: tokens 3 and 4 (0-based) are rows 2 and 3.
    assert future.result() == [[-3.0, -4.0]]


def test_abort_takes_out_what_is_left_and_answers_none():
    core, batches = FakeEngineCore(), ScoreBatches(build_in_thread=False)
    sequences = [ScoringSequence((1, 2, 3), candidate_ids=(7,)) for _ in range(3)]
    future = submitted(core, batches, batch("b3", sequences))
    done_id = core.added[0].request_id
    batches.take_outputs({0: EngineCoreOutputs(outputs=[candidate_output(done_id, [-1.0])])})
    assert batches.abort(core, "b3") is True
    assert core.aborted == [r.request_id for r in core.added[1:]]
    assert future.result() is None
    assert (len(batches), batches.num_requests) == (0, 0)
    assert batches.abort(core, "b3") is False and batches.abort(core, "never-sent") is False


def test_a_request_that_ends_without_its_log_probs_fails_only_its_batch():
    core, batches = FakeEngineCore(), ScoreBatches(build_in_thread=False)
    broken = submitted(core, batches, batch("b4", [ScoringSequence((1, 2), candidate_ids=(3,))]))
    healthy = submitted(core, batches, batch("b5", [ScoringSequence((1, 2), candidate_ids=(3,))]))
    broken_id, healthy_id = (r.request_id for r in core.added)
    aborted = EngineCoreOutput(broken_id, [], finish_reason=FinishReason.ABORT)
    to_abort = batches.take_outputs({0: EngineCoreOutputs(outputs=[aborted, candidate_output(healthy_id, [-0.25])])})
    with pytest.raises(RuntimeError, match="without its log-probs"):
        broken.result()
    assert healthy.result() == [[-0.25]]
    assert to_abort == []  # the broken batch had nothing else running


def test_the_rest_of_a_failed_batch_is_handed_back_for_abort():
    core, batches = FakeEngineCore(), ScoreBatches(build_in_thread=False)
    future = submitted(core, batches, batch("b6", [ScoringSequence((1, 2), candidate_ids=(3,))] * 3))
    first, second, third = (r.request_id for r in core.added)
    batches.take_outputs({0: EngineCoreOutputs(outputs=[candidate_output(first, [-1.0])])})
    to_abort = batches.take_outputs({0: EngineCoreOutputs(outputs=[EngineCoreOutput(second, [], finish_reason=FinishReason.ABORT)])})
    assert to_abort == [third]
    with pytest.raises(RuntimeError):
        future.result()
    assert (len(batches), batches.num_requests) == (0, 0)


def test_bad_batches_are_refused_before_anything_reaches_the_scheduler():
    core, batches = FakeEngineCore(max_model_len=8), ScoreBatches(build_in_thread=False)
    submitted(core, batches, batch("dup", [ScoringSequence((1, 2), candidate_ids=(3,))]))
    with pytest.raises(ValueError, match="already running"):
        batches.submit(core, batch("dup", [ScoringSequence((1, 2), candidate_ids=(3,))]))
    with pytest.raises(ValueError, match="a score batch is"):
        batches.submit(core, ("only an id",))
    cases = {
        "has 8 tokens": batch("long", [ScoringSequence(tuple(range(1, 9)), candidate_ids=(3,))]),
        "token id outside": batch("tok", [ScoringSequence((1, VOCAB), candidate_ids=(3,))]),
        "candidate outside": batch("cand", [ScoringSequence((1, 2), candidate_ids=(VOCAB,))]),
        "target_start 0": batch("start", [ScoringSequence((1, 2), target_start=0)]),
    }
    for message, wire in cases.items():
        with pytest.raises(ValueError, match=message):
            submitted(core, batches, wire).result()
    assert len(core.added) == 1 and (len(batches), batches.num_requests) == (1, 1)


def test_the_builder_thread_builds_off_the_main_thread_and_wakes_the_loop():
    core, batches = FakeEngineCore(), ScoreBatches()
    future = batches.submit(core, batch("t1", [ScoringSequence((1, 2, 3), candidate_ids=(7,))] * 3))
    assert core.input_queue.get(timeout=5) == (EngineCoreRequestType.WAKEUP, None)
    assert core.added == []  # nothing reaches the scheduler before the main thread takes it
    batches.add_built(core)
    assert len(core.added) == 3
    batches.take_outputs({0: EngineCoreOutputs(outputs=[candidate_output(r.request_id, [-1.0]) for r in core.added])})
    assert future.result(timeout=5) == [[-1.0]] * 3
    batches.close()


def test_a_batch_aborted_while_it_is_built_never_reaches_the_scheduler():
    core, batches = FakeEngineCore(), ScoreBatches(build_in_thread=False)
    future = batches.submit(core, batch("t2", [ScoringSequence((1, 2, 3), candidate_ids=(7,))] * 2))
    assert batches.abort(core, "t2") is True and future.result() is None
    batches.add_built(core)
    assert core.added == [] and core.aborted == []
    assert (len(batches), batches.num_requests) == (0, 0)


def test_an_empty_batch_resolves_at_once():
    core, batches = FakeEngineCore(), ScoreBatches(build_in_thread=False)
    assert batches.submit(core, batch("empty", [])).result() == []
    assert core.added == [] and len(batches) == 0
