"""Every Redis key the store uses, in one place.

Per-adapter keys carry the name in a hash tag (`{name}`) so one adapter's keys share a cluster slot and the
commit script touches a single slot. The adapter index set is the one cross-adapter key.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_PREFIX = "zoserve:store:"


@dataclass(frozen=True)
class RedisKeys:
    prefix: str = DEFAULT_PREFIX

    def adapters(self) -> str:
        """SET of adapter names."""
        return f"{self.prefix}adapters"

    def meta(self, name: str) -> str:
        """HASH: base_model, rank, alpha, target_modules (JSON), created_at, head."""
        return f"{self.prefix}adapter:{{{name}}}:meta"

    def records(self, name: str) -> str:
        """HASH: version → encoded VersionRecord (adapters_store.codec)."""
        return f"{self.prefix}adapter:{{{name}}}:records"

    def snapshots(self, name: str) -> str:
        """HASH: version → SnapshotRef as JSON."""
        return f"{self.prefix}adapter:{{{name}}}:snapshots"

    def pins(self, name: str) -> str:
        """SET of pinned versions."""
        return f"{self.prefix}adapter:{{{name}}}:pins"

    def all_for(self, name: str) -> tuple[str, ...]:
        return (self.meta(name), self.records(name), self.snapshots(name), self.pins(name))
