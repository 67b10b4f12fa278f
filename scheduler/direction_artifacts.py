"""Per-job direction artifacts (per-block scales, sparse mask) as one content-addressed safetensors blob.

The same bytes go three ways, so the engine's probes and the store's replay use bit-identical artifacts:
- to the worker, inside the method wire `(name, hyper items, blob)` of `set_state`;
- into the adapter store (`AdapterStore.put_artifact`), keyed by its sha256;
- into every version record the job commits, as the hyper-parameter `artifacts.<sha256 hex>`,
  so replay knows which artifact rebuilt that step's method (a later job may use another one, or none).

Blob layout: `scale/<PEFT tensor name>` float64 scalars (already normalised, `block_scales.normalise_scales`)
and `mask/<PEFT tensor name>` bool tensors of the tensor's shape; either group may be absent.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from scheduler.zo.lora_layout import LoraLayout
from scheduler.zo.methods import DirectionArtifacts, build_method, parse_hyper
from scheduler.zo.sparse_mask import validate_mask
from scheduler.zo.zo_step import ZoMethod

HPARAM_PREFIX = "artifacts."
_FORMAT = "zoserve-direction-artifacts-1"


class MissingArtifact(KeyError):
    """A version record names an artifact the caller has not supplied (fetch it from the store and retry)."""

    def __init__(self, artifact_id: str):
        super().__init__(artifact_id)
        self.artifact_id = artifact_id


def artifact_id(blob: bytes) -> str:
    return hashlib.sha256(blob).hexdigest()  # = AdapterStore.put_artifact's id


def encode_artifacts(
    layout: LoraLayout, block_scales: Mapping[str, float] | None = None, mask: Mapping[str, torch.Tensor] | None = None
) -> bytes:
    """The blob for normalised `block_scales` and/or a `mask` over `layout` (validated here)."""
    if block_scales is None and mask is None:
        raise ValueError("artifacts: give block_scales, a mask, or both")
    tensors: dict[str, torch.Tensor] = {}
    if block_scales is not None:
        _check_scales(block_scales, layout)
        for spec in layout.tensors:
            tensors[f"scale/{spec.name}"] = torch.tensor(float(block_scales[spec.name]), dtype=torch.float64)
    if mask is not None:
        for name, keep in validate_mask(mask, layout).items():
            tensors[f"mask/{name}"] = keep.contiguous()
    return save_tensors(tensors, metadata={"format": _FORMAT})


def decode_artifacts(blob: bytes, layout: LoraLayout) -> DirectionArtifacts:
    tensors = load_tensors(bytes(blob))
    scales = {k.removeprefix("scale/"): float(v.item()) for k, v in tensors.items() if k.startswith("scale/")}
    masks = {k.removeprefix("mask/"): v for k, v in tensors.items() if k.startswith("mask/")}
    unknown = [k for k in tensors if not k.startswith(("scale/", "mask/"))]
    if unknown:
        raise ValueError(f"artifacts[{unknown[0]!r}]: not a scale or a mask")
    if scales:
        _check_scales(scales, layout)
    return DirectionArtifacts(scales or None, validate_mask(masks, layout) if masks else None)


def _check_scales(scales: Mapping[str, float], layout: LoraLayout) -> None:
    names = {spec.name for spec in layout.tensors}
    if set(scales) != names:
        odd = sorted(set(scales) ^ names)[0]
        raise ValueError(f"block_scales[{odd!r}]: the scales must cover exactly the adapter's tensors")


def build_with_artifacts(name: str, hyper, blob: bytes | None, layout: LoraLayout) -> ZoMethod:
    """The method of a job spec or a record, with its artifacts if it has any."""
    if not blob:
        return build_method(name, hyper)
    artifacts = decode_artifacts(blob, layout)
    return build_method(name, hyper, block_scales=artifacts.block_scales, mask=artifacts.mask)


def artifact_hparam(blob_id: str) -> tuple[str, float]:
    """The entry a version record carries to name its artifact (its value is unused)."""
    return (f"{HPARAM_PREFIX}{blob_id}", 1.0)


def split_hparams(hparams: Sequence[tuple[str, float]]) -> tuple[tuple[tuple[str, float], ...], str | None]:
    """(the method's own hyper-parameters, the artifact id or None) of a version record."""
    ids = [k.removeprefix(HPARAM_PREFIX) for k, _ in hparams if k.startswith(HPARAM_PREFIX)]
    if len(ids) > 1:
        raise ValueError(f"hparams: {len(ids)} artifacts named in one record")
    return tuple((k, v) for k, v in hparams if not k.startswith(HPARAM_PREFIX)), (ids[0] if ids else None)


def method_from_wire(wire: Sequence, layout: LoraLayout) -> ZoMethod:
    """(method name, ((hyper name, value), …)[, artifacts blob]) → the method, on the worker."""
    name, items = wire[0], wire[1]
    blob = wire[2] if len(wire) > 2 else None
    return build_with_artifacts(name, parse_hyper(name, dict(items)), blob, layout)
