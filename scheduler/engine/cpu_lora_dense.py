"""LoRA over a packed linear layer in a few GEMMs for every adapter a step uses: vLLM's CPU
`add_lora_linear`, replaced.

vLLM's CPU punica wrapper runs a packed layer's LoRA (OPT's and Llama's `qkv_proj` under q_proj/v_proj
targets) as a shrink and an expand per slice, each a separate op (engine/cpu_lora_ops.py groups their tokens
by adapter: a GEMM per adapter or long run, a gather and a scatter for the rest). On this model the ops are
tiny and their count is the cost: with users decoding next to probe chunks a forward's two qkv layers took
~0.55 ms each, a quarter of the forward (py-spy of the engine core, session 10), and ~0.2 ms each for a
decode step of 7 tokens.

Here a slice is four ops for every adapter at once: the active slots' A stacked into one [K·r, in] matrix
(one gather), one shrink GEMM for every token against all of them, a mask that keeps each token's own
adapter's r columns (and applies the scale), and one expand GEMM into the slice of the output, in place.
Tokens pay K times the (tiny) FLOPs of their own adapter, so past `DENSE_MAX_ADAPTERS` active adapters the
grouped path takes over again. Tokens without an adapter (index −1) get no contribution, as in
cpu_lora_ops. The mask is cached against the step's token → slot indices (every layer of a forward has the
same); the weights are gathered on every call, because vLLM writes its slot buffers under inference mode,
where tensors carry no version counter to cache against.

`install()` checks the replacement against vLLM's own `add_lora_linear` on random inputs first and leaves
vLLM untouched if they differ; the worker extension calls it in the process that runs the model.
"""

from __future__ import annotations

import logging

import torch

from scheduler.engine.cpu_lora_ops import is_all_zero, slot_matrices

log = logging.getLogger(__name__)

# Past this many adapters in one step the dense pass may cost more FLOPs than the grouped ops save in op count.
# Micro-benchmark, one thread, rank 8, one qkv layer (q/v targets), dense against grouped, in µs:
#   hidden 128 (tiny-opt): 7 decode tokens on 3 adapters 75 / 197; 249 mixed tokens on 5 adapters 161 / 544;
#     792 probe tokens on 2 adapters 197 / 523; 4000 tokens on 8 adapters 2082 / 3921, on 16 3793 / 4222;
#   hidden 768 (OPT-125m): 7 decode tokens 102 / 276; 249 mixed 680 / 1383; 4000 tokens on 4 adapters
#     5686 / 17648, on 8 11181 / 17196, on 16 19052 / 17992.
DENSE_MAX_ADAPTERS = 8


class _StepMasks:
    """Each token's own adapter's columns: `active` (the step's distinct slots, sorted) and, per rank and
    scale, a [T, K·r] matrix holding `scale` where column k·r..(k+1)·r belongs to the token's slot and 0
    elsewhere. Cached against a copy of the last index vector; one `torch.equal` per call checks it."""

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._num_rows = -1
        self.active = torch.empty(0, dtype=torch.long)
        self._onehot = torch.empty(0, 0)
        self._scaled: dict[tuple[int, float, torch.dtype], torch.Tensor] = {}

    def refresh(self, indices: torch.Tensor, num_rows: int) -> None:
        key = self._key
        if key is not None and self._num_rows == num_rows and key.shape == indices.shape and torch.equal(key, indices):
            return
        self._key, self._num_rows = indices.clone(), num_rows
        valid = indices[indices >= 0]
        self.active = torch.unique(valid) if valid.numel() else torch.empty(0, dtype=torch.long)
        onehot = torch.zeros(num_rows, self.active.numel())
        if self.active.numel():
            rows = min(num_rows, indices.numel())
            onehot[:rows] = (indices[:rows].unsqueeze(1) == self.active.unsqueeze(0)).to(onehot.dtype)
        self._onehot = onehot
        self._scaled.clear()

    def columns(self, rank: int, scale: float, dtype: torch.dtype) -> torch.Tensor:
        key = (rank, float(scale), dtype)
        mask = self._scaled.get(key)
        if mask is None:
            mask = (self._onehot.repeat_interleave(rank, dim=1) * scale).to(dtype)
            self._scaled[key] = mask
        return mask


_MASKS = _StepMasks()


def add_lora_linear_dense(y, x, token_indices, lora_a_stacked, lora_b_stacked, scale, output_slices) -> bool:
    """y[t, slice i] += scale · x[t] @ A_i[slot t].T @ B_i[slot t].T for every token t with a slot; False
    (nothing done) when the step has more than DENSE_MAX_ADAPTERS adapters."""
    x2 = x.view(-1, x.shape[-1])
    _MASKS.refresh(token_indices, x2.shape[0])
    active = _MASKS.active
    num_active = active.numel()
    if num_active == 0:
        return True
    if num_active > DENSE_MAX_ADAPTERS:
        return False
    y2 = y.view(-1, y.shape[-1])
    inputs = x2.float()
    offset = 0
    for a, b, size in zip(lora_a_stacked, lora_b_stacked, output_slices, strict=True):
        if not (is_all_zero(a) or is_all_zero(b)):
            a3, b3 = slot_matrices(a), slot_matrices(b)  # [S, r, in], [S, out, r]
            rank = a3.shape[1]
            a_active = a3.index_select(0, active).reshape(num_active * rank, a3.shape[2]).float()
            h = torch.mm(inputs, a_active.T)
            h.mul_(_MASKS.columns(rank, scale, h.dtype))
            b_active = b3.index_select(0, active)[:, :size, :].permute(0, 2, 1).reshape(num_active * rank, -1).float()
            target = y2[:, offset : offset + b_active.shape[1]]
            if target.dtype == torch.float32:
                target.addmm_(h, b_active)
            else:
                target.add_(torch.mm(h, b_active).to(target.dtype))
        offset += size
    return True


def _patched(stock):
    def add_lora_linear(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, *, buffer=None, **kwargs):
        if getattr(self, "is_prefill", False) and getattr(self, "no_lora", False):
            return None  # vLLM's prefill path adds nothing when no request has an adapter
        if add_lora_linear_dense(
            y, x, self.token_lora_indices, lora_a_stacked, lora_b_stacked, scale, output_slices
        ):
            return None
        return stock(self, y, x, lora_a_stacked, lora_b_stacked, scale, output_slices, buffer=buffer, **kwargs)

    add_lora_linear.zoserve_dense = True
    add_lora_linear.__wrapped_stock__ = stock
    return add_lora_linear


def _wrapper_for(wrapper_cls, indices: torch.Tensor, prefill: bool):
    wrapper = wrapper_cls(max(64, indices.numel()), max(16, indices.numel()), "cpu")
    wrapper._token_lora_indices[: indices.numel()].copy_(indices)
    wrapper.indices_len[:] = [indices.numel()] * len(wrapper.indices_len)
    if prefill:
        wrapper._update_prefill_metadata(wrapper.token_lora_indices)
    wrapper.is_prefill = prefill
    return wrapper


def _agrees_with_stock(wrapper_cls, stock) -> bool:
    """The dense pass against vLLM's own `add_lora_linear` (its per-slice shrink and expand) on random data:
    a packed layer with a zero middle slice (the k of q/v targets), in a prefill and a decode step."""
    g = torch.Generator().manual_seed(0)
    num_slots, rank, d_in, sizes = 4, 4, 12, (6, 6, 5)
    lora_a = tuple(torch.randn(num_slots, 1, rank, d_in, generator=g) for _ in sizes)
    lora_b = tuple(torch.randn(num_slots, 1, size, rank, generator=g) for size in sizes)
    lora_a[1].zero_()
    lora_b[1].zero_()
    cases = (
        (torch.repeat_interleave(torch.tensor([2, 0, 2, 3]), torch.tensor([3, 5, 2, 4])), True),
        (torch.tensor([1, 3, 0, 1]), False),
    )
    for indices, prefill in cases:
        wrapper = _wrapper_for(wrapper_cls, indices, prefill)
        x = torch.randn(indices.numel(), d_in, generator=g)
        base = torch.randn(indices.numel(), sum(sizes), generator=g)
        expected, actual = base.clone(), base.clone()
        stock(wrapper, expected, x, lora_a, lora_b, 0.5, sizes)
        if not add_lora_linear_dense(actual, x, wrapper.token_lora_indices, lora_a, lora_b, 0.5, sizes):
            return False
        if not torch.allclose(expected, actual, rtol=1e-5, atol=1e-5):
            log.warning("dense LoRA pass disagrees with vLLM's add_lora_linear; keeping the per-slice ops")
            return False
    return True


def installed() -> bool:
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:
        return False
    return bool(getattr(PunicaWrapperCPU.add_lora_linear, "zoserve_dense", False))


def install() -> bool:
    """Put the dense pass in front of vLLM's CPU `add_lora_linear` if it agrees with it."""
    try:
        from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU
    except ImportError:
        return False
    if installed():
        return True
    current = PunicaWrapperCPU.add_lora_linear
    if not _agrees_with_stock(PunicaWrapperCPU, current):
        return False
    PunicaWrapperCPU.add_lora_linear = _patched(current)
    return True
