"""PEFT adapter directories: the interchange format for what leaves the process.

`adapter_config.json` + `adapter_model.safetensors`, exactly what `peft.PeftModel.from_pretrained` and vLLM's
LoRA loader read. Writes go to a temporary directory that is renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"


@dataclass(frozen=True)
class PeftAdapterConfig:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    base_model: str = ""

    def to_json(self) -> dict:
        return {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "target_modules": sorted(self.target_modules),
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "use_rslora": False,
            "base_model_name_or_path": self.base_model,
        }


def write_peft_dir(theta: dict[str, torch.Tensor], config: PeftAdapterConfig, out_dir: Path | str) -> Path:
    """Write θ (PEFT-named tensors, any float dtype) as a PEFT directory at `out_dir`, atomically."""
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        tensors = {name: t.detach().to("cpu", torch.float32).contiguous() for name, t in theta.items()}
        save_file(tensors, staging / WEIGHTS_FILE, metadata={"format": "pt"})
        (staging / CONFIG_FILE).write_text(json.dumps(config.to_json(), indent=2))
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def read_peft_dir(path: Path | str) -> tuple[dict[str, torch.Tensor], PeftAdapterConfig]:
    path = Path(path)
    raw = json.loads((path / CONFIG_FILE).read_text())
    config = PeftAdapterConfig(
        rank=int(raw["r"]),
        alpha=float(raw["lora_alpha"]),
        target_modules=tuple(raw["target_modules"]),
        base_model=raw.get("base_model_name_or_path") or "",
    )
    return load_file(path / WEIGHTS_FILE), config
