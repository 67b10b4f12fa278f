"""Snapshot blobs: a full `AdapterState` (θ and optimiser tensors) as one safetensors file in memory.

Tensors are stored as given (fp32 on the engine), so a load returns bit-identical values.
"""

from __future__ import annotations

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from adapters_store.errors import IntegrityError
from adapters_store.records import AdapterState

_THETA = "theta/"
_OPTIM = "optim/"


def encode_state(state: AdapterState, metadata: dict[str, str] | None = None) -> bytes:
    tensors: dict[str, torch.Tensor] = {}
    for prefix, group in ((_THETA, state.theta), (_OPTIM, state.optimizer_state)):
        for name, tensor in group.items():
            tensors[prefix + name] = tensor.detach().to("cpu").contiguous()
    return st_save(tensors, metadata={"format": "zoserve-state", **(metadata or {})})


def decode_state(data: bytes) -> AdapterState:
    try:
        tensors = st_load(data)
    except Exception as exc:  # safetensors raises its own error types for malformed headers
        raise IntegrityError(f"snapshot is not a readable safetensors blob: {exc}") from exc
    theta = {k[len(_THETA) :]: v for k, v in tensors.items() if k.startswith(_THETA)}
    optim = {k[len(_OPTIM) :]: v for k, v in tensors.items() if k.startswith(_OPTIM)}
    return AdapterState(theta, optim)
