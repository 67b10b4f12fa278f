"""The canonical layout of a LoRA adapter state θ: PEFT tensor names and shapes, in a fixed order.

θ is a plain `dict[str, Tensor]` keyed by PEFT state-dict names (without the adapter name), e.g.
`base_model.model.model.decoder.layers.0.self_attn.q_proj.lora_A.weight` with A: [r, in] and B: [out, r].
Every component that generates directions from seeds iterates `LoraLayout.tensors` in this order, which is
what makes the engine worker, the baseline loop and store replay draw identical z.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

PEFT_PREFIX = "base_model.model."


@dataclass(frozen=True)
class LoraShape:
    rank: int
    alpha: float
    target_modules: tuple[str, ...]

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


@dataclass(frozen=True)
class TensorSpec:
    name: str  # PEFT state-dict key
    shape: tuple[int, ...]
    module: str  # base-model module path, e.g. model.decoder.layers.0.self_attn.q_proj
    kind: str  # "A" | "B"

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class LoraLayout:
    shape: LoraShape
    tensors: tuple[TensorSpec, ...]  # sorted by name

    @property
    def num_params(self) -> int:
        return sum(t.numel for t in self.tensors)

    @property
    def modules(self) -> tuple[str, ...]:
        return tuple(sorted({t.module for t in self.tensors}))


def layout_for_linears(linears: dict[str, tuple[int, int]], shape: LoraShape) -> LoraLayout:
    """Layout over base-model linear modules {module path: (in_features, out_features)} that match targets."""
    specs: list[TensorSpec] = []
    for module, (in_features, out_features) in linears.items():
        if module.rsplit(".", 1)[-1] not in shape.target_modules:
            continue
        stem = f"{PEFT_PREFIX}{module}"
        specs.append(TensorSpec(f"{stem}.lora_A.weight", (shape.rank, in_features), module, "A"))
        specs.append(TensorSpec(f"{stem}.lora_B.weight", (out_features, shape.rank), module, "B"))
    if not specs:
        raise ValueError(f"no linear module of the model matches target_modules={list(shape.target_modules)}")
    return LoraLayout(shape, tuple(sorted(specs, key=lambda s: s.name)))


def layout_for_model_dir(model_dir: Path | str, shape: LoraShape) -> LoraLayout:
    """Layout for a Hugging Face model directory, read from its config without loading weights."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    linears = {
        name: (module.in_features, module.out_features)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and name != "lm_head"
    }
    return layout_for_linears(linears, shape)


def initial_state(layout: LoraLayout, seed: int) -> dict[str, torch.Tensor]:
    """PEFT's default LoRA init (A ~ kaiming-uniform(a=√5) = U(±1/√in), B = 0) from a dedicated generator."""
    generator = torch.Generator(device="cpu").manual_seed(seed)
    theta: dict[str, torch.Tensor] = {}
    for spec in layout.tensors:
        if spec.kind == "A":
            bound = 1.0 / math.sqrt(spec.shape[1])
            theta[spec.name] = (torch.rand(spec.shape, generator=generator) * 2 - 1) * bound  # [r, in]
        else:
            theta[spec.name] = torch.zeros(spec.shape)  # [out, r]
    return theta
