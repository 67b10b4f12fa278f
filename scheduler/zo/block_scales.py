"""Per-block perturbation scales (ZO Fine-tuner style): one scale per adapter tensor, from a file.

ZO Fine-tuner (2025) learns a perturbation scale per
parameter block; here the learnt scales are an input: a JSON object {PEFT tensor name: scale} or a
safetensors file {PEFT tensor name: scalar tensor}. Every tensor of the layout needs a scale, no other name is
accepted, and scales must be finite and ≥ 0 with at least one > 0.

`normalise_scales` rescales them so that Σ_t numel_t·s_t² = Σ_t numel_t: E‖s⊙z‖² = E‖z‖², the perturbation
keeps MeZO's overall size and only its distribution over blocks changes. The file path comes from server
configuration or the artifact store, never from an API request.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

from scheduler.zo.lora_layout import LoraLayout


def normalise_scales(raw: Mapping[str, float], layout: LoraLayout) -> dict[str, float]:
    """Validated, normalised scales for every tensor of `layout` (ValueError names the offending key)."""
    names = {spec.name for spec in layout.tensors}
    unknown = sorted(set(raw) - names)
    if unknown:
        raise ValueError(f"block_scales[{unknown[0]!r}]: not a tensor of this adapter layout")
    missing = sorted(names - set(raw))
    if missing:
        raise ValueError(f"block_scales[{missing[0]!r}]: missing (every adapter tensor needs a scale)")
    for name, value in raw.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"block_scales[{name!r}]: {value!r} is not a finite number ≥ 0")
    energy = sum(spec.numel * float(raw[spec.name]) ** 2 for spec in layout.tensors)
    if energy == 0.0:
        raise ValueError("block_scales: all scales are 0")
    factor = math.sqrt(layout.num_params / energy)
    return {spec.name: float(raw[spec.name]) * factor for spec in layout.tensors}


def read_scales_file(path: Path | str) -> dict[str, float]:
    """Raw scales from `.json` or `.safetensors` (each value a one-element tensor)."""
    path = Path(path)
    if path.suffix == ".json":
        data = json.loads(path.read_text())
        if not isinstance(data, dict):
            raise ValueError("block_scales: the JSON file must hold an object {tensor name: scale}")
        return dict(data)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        out: dict[str, float] = {}
        for name, tensor in load_file(str(path)).items():
            if tensor.numel() != 1:
                raise ValueError(f"block_scales[{name!r}]: expected one value, got shape {tuple(tensor.shape)}")
            out[name] = float(tensor.reshape(()).item())
        return out
    raise ValueError(f"block_scales: unsupported file type {path.suffix!r} (use .json or .safetensors)")


def load_block_scales(path: Path | str, layout: LoraLayout) -> dict[str, float]:
    return normalise_scales(read_scales_file(path), layout)
