"""A job's direction artifacts: validated at creation, computed once at start, then reused from the store.

A job may ask for per-block scales (given inline, normalised here) and/or a sparse mask computed from real
backprop on its own training text at the adapter's head (`scheduler.sensitivity`). The blob is stored with
the adapter (`AdapterStore.put_artifact`) and its id written into the job spec, so a restarted job uses the
same artifacts instead of recomputing a mask at a different θ; every record the job commits names it too.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import torch

from scheduler.direction_artifacts import build_with_artifacts, encode_artifacts
from scheduler.errors import InvalidJobSpec
from scheduler.jobs import JobSpec
from scheduler.objectives import LabelledText
from scheduler.sensitivity import sensitivity_mask
from scheduler.zo.block_scales import normalise_scales
from scheduler.zo.lora_layout import LoraLayout
from scheduler.zo.methods import InvalidHyperParameter, build_method

if TYPE_CHECKING:
    from scheduler.runtime import Runtime

MAX_MASK_BATCHES = 64


def has_artifacts(spec: JobSpec) -> bool:
    return bool(spec.block_scales) or spec.sparse_mask is not None or spec.artifact_id is not None


def validate_artifacts(spec: JobSpec, hyper, layout: LoraLayout) -> None:
    """InvalidJobSpec naming the field when the job's scales or mask request cannot work with its method."""
    if not has_artifacts(spec):
        return
    scales = None
    if spec.block_scales:
        try:
            scales = normalise_scales(dict(spec.block_scales), layout)
        except ValueError as exc:
            raise InvalidJobSpec("direction.block_scales", str(exc)) from None
    mask = None
    if spec.sparse_mask is not None:
        request = spec.sparse_mask
        if not 0.0 < request.fraction <= 1.0:
            raise InvalidJobSpec("direction.sparse_mask.fraction", f"{request.fraction!r} must be in (0, 1]")
        if not 1 <= request.num_batches <= MAX_MASK_BATCHES or request.batch_size < 1:
            raise InvalidJobSpec("direction.sparse_mask.num_batches", f"num_batches in [1, {MAX_MASK_BATCHES}], batch_size >= 1")
        mask = {spec_.name: torch.ones(spec_.shape, dtype=torch.bool) for spec_ in layout.tensors}
    try:
        build_method(spec.method, hyper, block_scales=scales, mask=mask)
    except InvalidHyperParameter as exc:
        where = {"block_scales": "direction.block_scales", "mask": "direction.sparse_mask",
                 "weight_decay": "hyperparameters.weight_decay"}.get(exc.field, f"method_params.{exc.field}")
        raise InvalidJobSpec(where, str(exc)) from None


def _text_of(example) -> str:
    return example.text if isinstance(example, LabelledText) else example.prompt + example.completion


async def job_artifacts(runtime: Runtime, spec: JobSpec, layout: LoraLayout) -> tuple[bytes | None, str | None]:
    """(the artifacts blob, its store id), both None for a job without any; computed and stored once."""
    if spec.artifact_id is not None:
        return await runtime.store.get_artifact(spec.artifact_id), spec.artifact_id
    if not has_artifacts(spec):
        return None, None
    scales = normalise_scales(dict(spec.block_scales), layout) if spec.block_scales else None
    mask = None
    if spec.sparse_mask is not None:
        request = spec.sparse_mask
        theta = (await runtime.host.materialize(spec.adapter, "latest")).theta
        config = runtime.binding.config
        mask = await asyncio.to_thread(
            sensitivity_mask, config.model, layout, theta, [_text_of(e) for e in spec.examples], request.fraction,
            num_batches=request.num_batches, batch_size=request.batch_size, max_len=config.max_model_len,
        )
    blob = encode_artifacts(layout, scales, mask)
    return blob, await runtime.store.put_artifact(blob)


def method_and_wire(spec: JobSpec, hyper, blob: bytes | None, layout: LoraLayout, items: tuple):
    """The scheduler-side method and the worker's method wire, both with the same artifacts."""
    method = build_with_artifacts(spec.method, hyper, blob, layout)
    return method, ((spec.method, items, blob) if blob else (spec.method, items))
