"""Which slot serves which adapter, and the double buffer that lets an adapter change under live traffic.

Each served adapter owns two slots. New requests read the live buffer; a new version is written into the
other buffer only when no request is in flight on it, then becomes live. A request therefore sees exactly
one version from its first to its last token, and its cache salt names that version.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from scheduler.errors import AdapterNotServed


@dataclass(frozen=True)
class ServingLease:
    adapter: str
    slot: int
    version: int
    incarnation: str = ""  # distinguishes a re-created adapter whose version numbers restarted

    @property
    def cache_salt(self) -> str:
        """Names the state the slot holds, so prefix-cache KV is shared only between identical states."""
        return f"adapter:{self.adapter}:{self.incarnation}@{self.version}"


@dataclass
class _DoubleBuffer:
    slots: tuple[int, int]
    incarnation: str = ""
    released: asyncio.Event = field(default_factory=asyncio.Event)
    versions: list[int | None] = field(default_factory=lambda: [None, None])
    inflight: list[int] = field(default_factory=lambda: [0, 0])
    live: int | None = None  # index into slots


class ServingTable:
    def __init__(self) -> None:
        self._buffers: dict[str, _DoubleBuffer] = {}

    def register(self, adapter: str, slots: tuple[int, int], incarnation: str = "") -> None:
        self._buffers[adapter] = _DoubleBuffer(slots, incarnation)

    def unregister(self, adapter: str) -> tuple[int, int]:
        """Forget an adapter with no request in flight; returns its slots."""
        buf = self._buffers[adapter]
        if sum(buf.inflight):
            raise ValueError(f"{adapter} has requests in flight")
        del self._buffers[adapter]
        return buf.slots

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
        return ServingLease(adapter, buf.slots[buf.live], buf.versions[buf.live], buf.incarnation)

    def release(self, lease: ServingLease) -> None:
        buf = self._buffers[lease.adapter]
        buf.inflight[buf.slots.index(lease.slot)] -= 1
        buf.released.set()

    async def wait_release(self, adapter: str) -> None:
        """Until some request on `adapter` finishes."""
        buf = self._buffers[adapter]
        buf.released.clear()
        await buf.released.wait()

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

    def slot_usage(self, adapter: str) -> list[tuple[int, int]]:
        """(slot, requests in flight) of both buffers of `adapter`."""
        buf = self._buffers[adapter]
        return list(zip(buf.slots, buf.inflight))

    def inflight(self, adapter: str) -> int:
        return sum(self._buffers[adapter].inflight)
