"""vLLM worker extension: master adapter states on the worker, probe states written in place into LoRA slots.

Mixed into the vLLM worker through `worker_extension_cls` and driven with `collective_rpc`. Only seeds and
scalars cross the process boundary on the hot path; tensors move only when a state is registered or read
back. It touches private vLLM attributes (`lora_manager._adapter_manager`, `modules`, `lora_*_stacked`),
which is why the vLLM version is pinned and the binding self-tests slot writes against a PEFT load at start.

Slot buffers per LoRA layer (see VLLM_NOTES): `lora_a_stacked[slice]` [max_loras, 1, max_rank, in] and
`lora_b_stacked[slice]` [max_loras, 1, out, max_rank]; α/r is folded into B. Writes use in-place `copy_` so
kernels that cache buffer pointers stay valid.
"""

from __future__ import annotations

import gc
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors
from vllm.utils.gc_utils import freeze_gc_heap

from adapters_store.peft_format import PeftAdapterConfig, write_peft_dir
from scheduler.direction_artifacts import method_from_wire
from scheduler.engine import cpu_fast_paths, cpu_lora_dense, cpu_lora_ops
from scheduler.zo.lora_layout import LoraLayout, LoraShape, TensorSpec
from scheduler.zo.zo_step import (
    StepRecord,
    StepSeeds,
    TrainState,
    ZoMethod,
    apply_record,
    probe_values,
    probes_from_wire,
)

try:  # bf16 on AMX CPUs needs the tile permission requested in every process that runs the kernels.
    torch._C._cpu._init_amx()
except (AttributeError, RuntimeError):
    pass

# This module is imported in the process that runs the model: swap in grouped CPU LoRA ops and, in front of
# them, the dense pass over a step's adapters, and two vectorised per-step paths (each verified against vLLM's
# own first).
cpu_lora_ops.install()
cpu_lora_dense.install()
cpu_fast_paths.install()


def tensors_to_wire(tensors: dict[str, torch.Tensor]) -> bytes:
    """Tensors cross `collective_rpc` as safetensors bytes: exact and far cheaper than msgpack'd lists."""
    return save_tensors({name: t.detach().to("cpu").contiguous() for name, t in tensors.items()})


def tensors_from_wire(blob: bytes) -> dict[str, torch.Tensor]:
    return load_tensors(bytes(blob))


def layout_to_wire(layout: LoraLayout) -> tuple:
    shape = layout.shape
    return (
        (shape.rank, shape.alpha, tuple(shape.target_modules)),
        tuple((t.name, tuple(t.shape), t.module, t.kind) for t in layout.tensors),
    )


def layout_from_wire(wire: tuple) -> LoraLayout:
    (rank, alpha, targets), tensors = wire
    return LoraLayout(
        LoraShape(int(rank), float(alpha), tuple(targets)),
        tuple(TensorSpec(name, tuple(shape), module, kind) for name, shape, module, kind in tensors),
    )


@dataclass
class _MasterState:
    layout: LoraLayout
    state: TrainState  # θ and optimiser buffers, fp32, PEFT names
    method: ZoMethod | None  # None: a state that is served, not trained

    @property
    def theta(self) -> dict[str, torch.Tensor]:
        return self.state.theta


@dataclass(frozen=True)
class _SlotTarget:
    layer: object  # vLLM BaseLayerWithLoRA
    slice_index: int


class ZOWorkerExtension:
    """Methods callable via `collective_rpc("zo_*", args=...)`; `self` is the vLLM worker."""

    # ----------------------------------------------------------------- internals
    def _zo_states(self) -> dict[str, _MasterState]:
        if not hasattr(self, "_zo_master_states"):
            self._zo_master_states = {}
        return self._zo_master_states

    def _zo_manager(self):
        return self.model_runner.lora_manager._adapter_manager

    def _zo_slot_index(self, lora_id: int) -> int:
        try:
            return self._zo_manager().lora_index_to_id.index(lora_id)
        except ValueError as exc:
            raise KeyError(f"LoRA id {lora_id} is not active in any slot") from exc

    def _zo_targets(self, layout: LoraLayout) -> dict[str, _SlotTarget]:
        """PEFT module path → (vLLM LoRA layer, slice index), resolving packed modules like qkv_proj."""
        manager = self._zo_manager()
        modules = manager.modules
        packed = manager.packed_modules_mapping
        targets: dict[str, _SlotTarget] = {}
        for module in layout.modules:
            if module in modules:
                targets[module] = _SlotTarget(modules[module], 0)
                continue
            parent, leaf = module.rsplit(".", 1)
            for packed_name, parts in packed.items():
                if leaf in parts and f"{parent}.{packed_name}" in modules:
                    targets[module] = _SlotTarget(modules[f"{parent}.{packed_name}"], parts.index(leaf))
                    break
            else:
                raise KeyError(f"module {module} has no LoRA layer in the engine (check lora_target_modules)")
        return targets

    def _zo_clear_slot(self, slot: int) -> None:
        for layer in self._zo_manager().modules.values():
            layer.reset_lora(slot)

    def _zo_write_tensor(self, target: _SlotTarget, spec: TensorSpec, slot: int, value: torch.Tensor, scaling: float) -> None:
        if spec.kind == "A":  # value [r, in]
            r, n_in = value.shape
            target.layer.lora_a_stacked[target.slice_index][slot, 0, :r, :n_in].copy_(value)
        else:  # value [out, r]; α/r folded into B as vLLM does at registration
            n_out, r = value.shape
            target.layer.lora_b_stacked[target.slice_index][slot, 0, :n_out, :r].copy_(value * scaling)

    # ----------------------------------------------------------------- RPC surface
    def zo_model_process(self) -> tuple[int, int]:
        """(pid, torch threads) of the process the model runs in: the worker's, or the engine core's."""
        return os.getpid(), torch.get_num_threads()

    def zo_switch_interval(self, seconds: float | None = None) -> float:
        """The model process's GIL switch interval (`sys.setswitchinterval`); sets it first when given."""
        if seconds is not None:
            sys.setswitchinterval(float(seconds))
        return sys.getswitchinterval()

    def zo_freeze_heap(self) -> tuple[int, int]:
        """Collect, then freeze every object the model's process holds (`gc.freeze()`); returns (frozen, left
        in the old generation). vLLM freezes its engine core once, at its own start-up; what the binding's
        self-test, the LoRA slots and the first adapters load afterwards (~16k objects: modules, source-line
        caches, slot tensors) would otherwise be walked by every full collection, ~9 ms on this host, in the
        middle of an engine step that users wait behind. Those collections freed next to nothing (0–248
        objects each, timed in the co-serving benchmark)."""
        freeze_gc_heap()  # vLLM's own start-up freeze: collects every generation, then freezes
        return self.zo_gc_counts()

    def zo_gc_counts(self) -> tuple[int, int]:
        """(frozen objects, objects in the old generation) of the model's process."""
        return gc.get_freeze_count(), len(gc.get_objects(generation=2))

    def zo_lora_ops(self) -> list[str]:
        """Which of zoserve's CPU LoRA ops the model's process runs (each is installed only if it agrees
        with vLLM's own): "grouped" (cpu_lora_ops), "dense" (cpu_lora_dense)."""
        return [name for name, on in (("grouped", cpu_lora_ops.installed()), ("dense", cpu_lora_dense.installed())) if on]

    def zo_fast_paths(self, on: bool | None = None) -> list[str]:
        """Which of vLLM's per-step paths the model's process runs in zoserve's vectorised form
        (engine/cpu_fast_paths.py; each is installed only if it agrees with vLLM's own); `on` installs them
        or puts vLLM's own back first (A/B runs)."""
        if on is True:
            return cpu_fast_paths.install()
        if on is False:
            return cpu_fast_paths.uninstall()
        return cpu_fast_paths.installed()

    def zo_slot_indices(self, lora_ids: Sequence[int]) -> list[int]:
        return [self._zo_slot_index(int(i)) for i in lora_ids]

    def zo_clear_slots(self, lora_ids: Sequence[int]) -> None:
        for lora_id in lora_ids:
            self._zo_clear_slot(self._zo_slot_index(int(lora_id)))

    def zo_set_state(
        self, key: str, layout_wire: tuple, theta_wire: bytes, method_wire: tuple | None = None, buffers_wire: bytes | None = None
    ) -> int:
        """Register (or replace) the master state of `key`: θ, and for training the method and its buffers."""
        layout = layout_from_wire(layout_wire)
        theta = tensors_from_wire(theta_wire)
        missing = {t.name for t in layout.tensors} - set(theta)
        if missing:
            raise KeyError(f"state for {key} lacks tensors: {sorted(missing)[:3]}")
        method = method_from_wire(method_wire, layout) if method_wire is not None else None
        buffers = tensors_from_wire(buffers_wire) if buffers_wire else {}
        if method is not None:  # missing buffers start at init: the rule store replay applies too
            for name, value in method.optimiser.init_buffers(layout).items():
                buffers.setdefault(name, value)
        theta = {t.name: theta[t.name].detach().to(torch.float32).clone() for t in layout.tensors}
        buffers = {k: v.detach().to(torch.float32).clone() for k, v in buffers.items()}
        self._zo_states()[key] = _MasterState(layout, TrainState(theta, buffers), method)
        return layout.num_params

    def zo_drop_state(self, key: str) -> bool:
        return self._zo_states().pop(key, None) is not None

    def zo_get_state(self, key: str) -> tuple[bytes, bytes]:
        state = self._zo_states()[key].state
        return tensors_to_wire(state.theta), tensors_to_wire(state.buffers) if state.buffers else b""

    def zo_write_state(self, key: str, lora_id: int) -> None:
        """Copy the master θ of `key` (no perturbation) into the slot of `lora_id`."""
        state = self._zo_states()[key]
        slot = self._zo_slot_index(lora_id)
        targets = self._zo_targets(state.layout)
        scaling = state.layout.shape.scaling
        self._zo_clear_slot(slot)
        for spec in state.layout.tensors:
            self._zo_write_tensor(targets[spec.module], spec, slot, state.theta[spec.name], scaling)

    def zo_write_probes(
        self, key: str, step: int, seeds: Sequence[int], probes_wire: tuple, lora_ids: Sequence[int]
    ) -> None:
        """Write probe j of this step (θ plus seeded directions, see `Probe`) into the slot of lora_ids[j]."""
        master = self._zo_states()[key]
        method = master.method
        if method is None:
            raise KeyError(f"{key} has no training method registered")
        step_seeds = StepSeeds.from_tuple(int(step), seeds, method.num_directions)
        probes = probes_from_wire(probes_wire)
        slots = [self._zo_slot_index(int(i)) for i in lora_ids]
        if len(slots) != len(probes):
            raise ValueError(f"{len(probes)} probes for {len(slots)} slots")
        targets = self._zo_targets(master.layout)
        scaling = master.layout.shape.scaling
        for slot in slots:
            self._zo_clear_slot(slot)
        for spec, values in probe_values(master.theta, master.layout, method.perturbation, step_seeds, probes):
            for slot, value in zip(slots, values, strict=True):
                self._zo_write_tensor(targets[spec.module], spec, slot, value, scaling)

    def zo_apply_step(self, key: str, step: int, seeds: Sequence[int], coeffs: Sequence[float], lr: float) -> None:
        """θ (and buffers) ← the method's update from seeds and scalars: the same call store replay makes."""
        master = self._zo_states()[key]
        method = master.method
        step_seeds = StepSeeds.from_tuple(int(step), seeds, method.num_directions)
        record = StepRecord(step_seeds, (), tuple(float(c) for c in coeffs), float(lr))
        apply_record(method, master.state, master.layout, record)

    def zo_export_peft(self, key: str, out_dir: str, base_model: str = "") -> str:
        state = self._zo_states()[key]
        shape = state.layout.shape
        config = PeftAdapterConfig(shape.rank, shape.alpha, shape.target_modules, base_model)
        return str(write_peft_dir(state.theta, config, Path(out_dir)))
