"""The message a whole batch of scoring sequences travels in, from the service to vLLM's engine core, and back.

A ZO chunk is tens of short scoring sequences under one LoRA state. Sent as one `AsyncLLM.generate` each, every
sequence costs the service's event loop an input-processing pass, a msgpack encode, a zmq send, an output
record, a detokenising logprobs pass and a task wake-up, and the engine core a decode on its input thread
(measured in session 7: ~0.45 ms of service and ~0.28 ms of engine-core CPU per request, on the core the users'
requests need). Sent as one engine-core utility call (`zo_score_batch`, engine/score_batches.py), the chunk
costs one encode and one send, and its reply is one list of floats per sequence.

Plain tuples on the wire (vLLM's msgpack encoder carries them as they are). Pure: no vLLM, no torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.scoring import ScoringSequence

SCORE_BATCH_METHOD = "zo_score_batch"
ABORT_BATCH_METHOD = "zo_abort_batch"
RUNNING_BATCHES_METHOD = "zo_score_batches_running"  # (batches, requests) the engine core is still answering


@dataclass(frozen=True)
class SlotLora:
    """The LoRA a batch runs under, as vLLM's `LoRARequest` names it."""

    name: str
    int_id: int
    path: str


@dataclass(frozen=True)
class ScoreBatch:
    batch_id: str
    lora: SlotLora | None  # None: the base model
    salt: str  # the prefix-cache salt naming the state the batch reads
    priority: int
    sequences: tuple[ScoringSequence, ...]

    def to_wire(self) -> tuple:
        lora = None if self.lora is None else (self.lora.name, self.lora.int_id, self.lora.path)
        rows = [(list(s.token_ids), list(s.candidate_ids), s.target_start) for s in self.sequences]
        return (self.batch_id, lora, self.salt, self.priority, rows)

    @classmethod
    def from_wire(cls, wire: Sequence) -> ScoreBatch:
        batch_id, _ = batch_header(wire)
        _, lora, salt, priority, rows = wire
        if not isinstance(salt, str):
            raise ValueError(f"salt must be a string, got {salt!r}")
        if not isinstance(priority, int):
            raise ValueError(f"priority must be an int, got {priority!r}")
        slot = None
        if lora is not None:
            name, int_id, path = lora
            slot = SlotLora(str(name), int(int_id), str(path))
        sequences = tuple(
            ScoringSequence(tuple(int(t) for t in ids), tuple(int(c) for c in cands), int(start))
            for ids, cands, start in rows
        )
        return cls(batch_id, slot, salt, priority, sequences)


def batch_header(wire) -> tuple[str, int]:
    """(batch id, number of sequences) of a wire batch, checking only its shape and id (cheap: no sequence is
    read)."""
    if not isinstance(wire, (list, tuple)) or len(wire) != 5 or not isinstance(wire[4], (list, tuple)):
        raise ValueError(f"a score batch is (batch_id, lora, salt, priority, sequences), got {wire!r:.200}")
    batch_id = wire[0]
    if not isinstance(batch_id, str) or not batch_id:
        raise ValueError(f"batch_id must be a non-empty string, got {batch_id!r}")
    return batch_id, len(wire[4])


def scores_from_wire(rows: Sequence[Sequence[float]], num_sequences: int) -> list[tuple[float, ...]]:
    """The engine core's reply: one row of log-probs per sequence, in order."""
    if rows is None or len(rows) != num_sequences:
        got = "nothing" if rows is None else f"{len(rows)} rows"
        raise RuntimeError(f"a score batch of {num_sequences} sequences came back with {got}")
    return [tuple(float(x) for x in row) for row in rows]
