"""Typed records at the store's boundary: version records, snapshot references, adapter metadata, states.

A version is defined by its record and its parent: an UPDATE record holds what the optimiser needs to redo
the step (seeds, scalar coefficients, hyper-parameters, which batch); a ROLLBACK record says "this version's
state equals version `rollback_to`". Version 0 is the initial state and has no record, only a snapshot.
"""

from __future__ import annotations

import enum
import math
import re
import time
from dataclasses import dataclass, field

import torch

from adapters_store.errors import InvalidArgument
from adapters_store.peft_format import PeftAdapterConfig

# Adapter names end up in Redis keys, file names and `name@version` addresses: no separators, no paths.
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
MAX_U64 = 2**64 - 1
MAX_SHORT = 255  # count and short-string limit of the record codec


def validate_name(name: str) -> str:
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise InvalidArgument("name", f"{name!r} is not a valid adapter name ([A-Za-z0-9][A-Za-z0-9._-]{{0,127}})")
    return name


def validate_version(version: int, field_name: str = "version") -> int:
    if isinstance(version, bool) or not isinstance(version, int) or version < 0:
        raise InvalidArgument(field_name, f"{version!r} is not a non-negative integer")
    return version


def parse_address(address: str) -> tuple[str, int | None]:
    """`name` or `name@version` (version a number or "latest") → (name, version or None for the head)."""
    name, sep, version = address.partition("@")
    validate_name(name)
    if not sep or version == "latest":
        return name, None
    if not version.isdigit():
        raise InvalidArgument("version", f"{version!r} in {address!r} is neither a version number nor 'latest'")
    return name, int(version)


class RecordKind(enum.IntEnum):
    UPDATE = 1
    ROLLBACK = 2


@dataclass(frozen=True)
class VersionRecord:
    """One committed step. Adapter-independent: replay needs the adapter's layout from elsewhere."""

    version: int
    parent: int
    step: int
    optimizer: str = "mezo-sgd"
    seeds: tuple[int, ...] = ()
    coeffs: tuple[float, ...] = ()
    lr: float = 0.0
    weight_decay: float = 0.0
    eps: float = 0.0
    hparams: tuple[tuple[str, float], ...] = ()  # optimiser extras, e.g. (("momentum", 0.9),)
    batch_id: int = 0  # which data batch: the caller's encoding (e.g. epoch << 32 | offset, or a batch seed)
    kind: RecordKind = RecordKind.UPDATE
    rollback_to: int | None = None
    created_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        for name in ("version", "parent", "step", "batch_id"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_U64:
                raise InvalidArgument(name, f"{value!r} is not an unsigned 64-bit integer")
        if self.version != self.parent + 1:
            raise InvalidArgument("version", f"version {self.version} must be parent {self.parent} + 1")
        if not self.optimizer.isascii() or not 0 < len(self.optimizer) <= MAX_SHORT:
            raise InvalidArgument("optimizer", f"{self.optimizer!r} must be 1..{MAX_SHORT} ASCII characters")
        if len(self.seeds) > MAX_SHORT or len(self.coeffs) > MAX_SHORT or len(self.hparams) > MAX_SHORT:
            raise InvalidArgument("seeds", f"at most {MAX_SHORT} seeds, coefficients and hyper-parameters")
        for seed in self.seeds:
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_U64:
                raise InvalidArgument("seeds", f"{seed!r} is not an unsigned 64-bit integer")
        numbers = (*self.coeffs, self.lr, self.weight_decay, self.eps, *(v for _, v in self.hparams))
        if not all(isinstance(x, (int, float)) and math.isfinite(x) for x in numbers):
            raise InvalidArgument("coeffs", "coefficients and hyper-parameters must be finite numbers")
        for key, _ in self.hparams:
            if not key.isascii() or not 0 < len(key) <= MAX_SHORT:
                raise InvalidArgument("hparams", f"{key!r} must be 1..{MAX_SHORT} ASCII characters")
        if (self.kind == RecordKind.ROLLBACK) != (self.rollback_to is not None):
            raise InvalidArgument("rollback_to", "set exactly when kind is ROLLBACK")
        if self.rollback_to is not None:
            validate_version(self.rollback_to, "rollback_to")
            if self.rollback_to >= self.version:
                raise InvalidArgument("rollback_to", f"{self.rollback_to} is not an earlier version")

    def hparam(self, name: str, default: float | None = None) -> float | None:
        return next((v for k, v in self.hparams if k == name), default)


@dataclass(frozen=True)
class SnapshotRef:
    """Where the full state of one version lives. The blob key is its content address."""

    version: int
    blob_key: str
    sha256: str
    num_bytes: int
    created_at: float


@dataclass(frozen=True)
class AdapterMeta:
    name: str
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    created_at: float
    head: int

    def peft_config(self) -> PeftAdapterConfig:
        return PeftAdapterConfig(self.rank, self.alpha, self.target_modules, self.base_model)


@dataclass(frozen=True)
class AdapterState:
    """θ (PEFT names, fp32) and the optimiser's tensor state (e.g. momentum), both keyed by name.

    The dicts are owned by whoever holds this value; replay mutates fresh copies only.
    """

    theta: dict[str, torch.Tensor]
    optimizer_state: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass(frozen=True)
class AdapterCommit:
    """What `commit` produced: the record now at the head, and the snapshot written with it (if any)."""

    record: VersionRecord
    snapshot: SnapshotRef | None
