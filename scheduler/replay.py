"""Store replay with the engine's own arithmetic: the `apply_record` the adapter store is handed.

A version record names its method and hyper-parameters; the applier rebuilds that method and applies the
record exactly as the worker did (`scheduler.zo.zo_step.apply_record`), so replay on CPU in fp32 gives
bit-identical states.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import lru_cache

import torch

from adapters_store import VersionRecord
from scheduler.direction_artifacts import MissingArtifact, build_with_artifacts, split_hparams
from scheduler.zo.lora_layout import LoraLayout
from scheduler.zo.methods import hyper_items, parse_hyper
from scheduler.zo.zo_step import StepRecord, StepSeeds, TrainState, ZoMethod, apply_record

# Hyper-parameters that a version record carries in its own fields, not in `hparams`.
_RECORD_FIELDS = ("lr", "eps", "weight_decay")


def record_hparams(hyper) -> tuple[tuple[str, float], ...]:
    """The method's hyper-parameters minus those the record already holds (keeps records small)."""
    return tuple((k, float(v)) for k, v in hyper_items(hyper) if k not in _RECORD_FIELDS)


@lru_cache(maxsize=64)
def _method(
    name: str, hparams: tuple[tuple[str, float], ...], eps: float, weight_decay: float,
    artifacts: bytes | None = None, layout: LoraLayout | None = None,
) -> ZoMethod:
    # The hyper's lr is never read by replay: every record carries the lr its update was applied with.
    params = {**dict(hparams), "lr": 1.0, "eps": eps, "weight_decay": weight_decay}
    return build_with_artifacts(name, parse_hyper(name, params), artifacts, layout)


def method_for_record(
    record: VersionRecord, layout: LoraLayout | None = None, artifacts: Mapping[str, bytes] | None = None
) -> ZoMethod:
    """The record's method; a record naming an artifact needs it in `artifacts` (else `MissingArtifact`)."""
    hparams, blob_id = split_hparams(record.hparams)
    if blob_id is None:
        return _method(record.optimizer, hparams, record.eps, record.weight_decay)
    if artifacts is None or blob_id not in artifacts:
        raise MissingArtifact(blob_id)
    return _method(record.optimizer, hparams, record.eps, record.weight_decay, artifacts[blob_id], layout)


def fill_missing_buffers(method: ZoMethod, layout: LoraLayout, buffers: dict[str, torch.Tensor]) -> None:
    """A buffer the state does not hold yet (a new job, or a new method on an old adapter) starts at init.

    The worker applies the same rule when it registers a state, so replay and engine agree.
    """
    for key, value in method.optimiser.init_buffers(layout).items():
        buffers.setdefault(key, value)


def applier_for(
    layout: LoraLayout, artifacts: Mapping[str, bytes] | None = None
) -> Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], VersionRecord], None]:
    """Applies records as the worker did; `artifacts` (id → blob) serves records that name one."""

    def apply(theta: dict[str, torch.Tensor], buffers: dict[str, torch.Tensor], record: VersionRecord) -> None:
        method = method_for_record(record, layout, artifacts)
        fill_missing_buffers(method, layout, buffers)
        seeds = StepSeeds.from_tuple(record.step, record.seeds, method.num_directions)
        apply_record(method, TrainState(theta, buffers), layout, StepRecord(seeds, (), record.coeffs, record.lr))

    return apply
