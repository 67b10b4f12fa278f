"""Which slot serves which adapter, and the double buffer that lets an adapter change under live traffic.

Each served adapter owns two slots. New requests read the live buffer; a new version is written into the
other buffer only when no request is in flight on it, then becomes live. A request therefore sees exactly
one version from its first to its last token, and its cache salt names that version.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from scheduler.errors import AdapterNotServed


@dataclass(frozen=True)
class ServingLease:
    adapter: str
    slot: int
    version: int

    @property
    def cache_salt(self) -> str:
        return f"adapter:{self.adapter}@{self.version}"


@dataclass
class _DoubleBuffer:
    slots: tuple[int, int]
    versions: list[int | None] = field(default_factory=lambda: [None, None])
    inflight: list[int] = field(default_factory=lambda: [0, 0])
    live: int | None = None  # index into slots


class ServingTable:
    def __init__(self) -> None:
        self._buffers: dict[str, _DoubleBuffer] = {}

    def register(self, adapter: str, slots: tuple[int, int]) -> None:
        self._buffers[adapter] = _DoubleBuffer(slots)

    def adapters(self) -> list[str]:
        return sorted(name for name, buf in self._buffers.items() if buf.live is not None)

    def is_registered(self, adapter: str) -> bool:
        return adapter in self._buffers

    def live_version(self, adapter: str) -> int | None:
        buf = self._buffers.get(adapter)
        return None if buf is None or buf.live is None else buf.versions[buf.live]

    def acquire(self, adapter: str) -> ServingLease:
        buf = self._buffers.get(adapter)
        if buf is None or buf.live is None:
            raise AdapterNotServed(adapter)
        buf.inflight[buf.live] += 1
        return ServingLease(adapter, buf.slots[buf.live], buf.versions[buf.live])

    def release(self, lease: ServingLease) -> None:
        buf = self._buffers[lease.adapter]
        buf.inflight[buf.slots.index(lease.slot)] -= 1

    def publish_target(self, adapter: str) -> int | None:
        """The idle buffer's slot, if a new version may be written into it now."""
        buf = self._buffers[adapter]
        idle = 0 if buf.live is None else 1 - buf.live
        return buf.slots[idle] if buf.inflight[idle] == 0 else None

    def mark_published(self, adapter: str, slot: int, version: int) -> None:
        buf = self._buffers[adapter]
        index = buf.slots.index(slot)
        buf.versions[index] = version
        buf.live = index

    def inflight(self, adapter: str) -> int:
        return sum(self._buffers[adapter].inflight)
