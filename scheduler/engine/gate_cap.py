"""The per-step probe cap as one word of shared memory: the service's latency controller writes it, vLLM's
scheduler in the engine-core process reads it before every step (engine/step_gate_scheduler.py).

The step gate's static `tokens_with_users` is the most a step may take next to users; this word lowers it
while users' time to first token is over target (scheduler/coscheduler.py drives it with the same AIMD rules
as the in-flight budget). A file under the engine's work directory, memory-mapped on both sides: a read is one
`struct.unpack_from` (no message, no lock: a 4-byte aligned store is atomic on the platforms vLLM runs on),
and the writer never waits for the engine. A negative value means "no cap written yet": the static limit holds.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path

_WORD = struct.Struct("<i")
NO_CAP = -1


class GateCap:
    def __init__(self, path: Path, mapping: mmap.mmap) -> None:
        self.path = path
        self._map = mapping

    @classmethod
    def create(cls, path: Path) -> GateCap:
        """The writer's side: a fresh word holding NO_CAP."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(_WORD.pack(NO_CAP))
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> GateCap:
        with path.open("r+b") as f:
            return cls(path, mmap.mmap(f.fileno(), _WORD.size))

    def write(self, num_tokens: int) -> None:
        if num_tokens < 0:
            raise ValueError(f"a probe cap must be >= 0 tokens, got {num_tokens}")
        _WORD.pack_into(self._map, 0, int(num_tokens))

    def read(self) -> int | None:
        value = _WORD.unpack_from(self._map, 0)[0]
        return None if value < 0 else value

    def close(self) -> None:
        self._map.close()
