"""Grouped LoRA shrink/expand for vLLM's CPU punica wrapper.

vLLM 0.32's CPU path (`vllm.lora.ops.torch_ops`) gathers one LoRA weight matrix per token
(`weights[indices]` → [tokens, out, r]) and runs an einsum: for a ZO batch of ~1k tokens this moves
gigabytes per forward although the batch holds only a handful of distinct adapters. These drop-ins compute
the same products grouped by adapter, one GEMM per adapter present, and give tokens without an adapter
(index −1) no LoRA contribution instead of reading the last slot.

`install()` checks every replacement against the stock op on random inputs first and leaves vLLM untouched
if any differs; it runs in the worker process (imported by the worker extension).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


def _squeeze(weights: torch.Tensor) -> torch.Tensor:
    return weights.squeeze(1) if weights.dim() == 4 else weights  # [L, out, in]


class _Groups:
    """The token rows of each adapter in one index vector, worked out once per forward.

    Every LoRA layer of a forward gets the same token → adapter indices, so the grouping (a `unique` and one
    `nonzero` per adapter) is cached against a copy of the last index vector; one `torch.equal` per call
    decides whether it still holds. An adapter's rows are almost always one contiguous run (a request's
    tokens are consecutive, and the probe requests of a slot go in together): such a group is a slice, read
    and written as a view, with no gather or scatter.
    """

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._groups: list[tuple[int, slice | torch.Tensor]] = []

    def of(self, indices: torch.Tensor) -> list[tuple[int, slice | torch.Tensor]]:
        key = self._key
        if key is None or key.shape != indices.shape or not torch.equal(key, indices):
            self._groups = list(self._compute(indices))
            self._key = indices.clone()
        return self._groups

    @staticmethod
    def _compute(indices: torch.Tensor):
        for index in torch.unique(indices).tolist():
            if index < 0:
                continue
            rows = (indices == index).nonzero(as_tuple=True)[0]
            first, last = int(rows[0]), int(rows[-1])
            yield index, (slice(first, last + 1) if last - first + 1 == rows.numel() else rows)


_GROUPS = _Groups()

# Up to this many tokens (decode steps of a few user requests), one gathered weight per token and a batched
# matrix-vector product cost less than a GEMM per adapter (measured on 2 cores: 12 tokens over 12 adapters,
# 0.18 ms per shrink+expand pair gathered vs 0.45 ms grouped).
GATHER_MAX_TOKENS = 32


def _per_token(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """inputs[t] @ weights[index of t].T for each token t, zero where index < 0. [T, out]"""
    w = weights.index_select(0, indices.clamp(min=0))  # [T, out, in]
    products = torch.bmm(w, inputs.unsqueeze(-1).to(w.dtype)).squeeze(-1)  # [T, out]
    return products.masked_fill_((indices < 0).unsqueeze(-1), 0.0)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    weights = _squeeze(lora_a_weights)  # [L, r, in]
    rank = weights.shape[1]
    output_tensor[:, :rank] = 0
    _add_products(output_tensor[:, :rank], inputs.to(output_tensor.dtype), weights, lora_indices_tensor, scaling)


def _add_products(
    target: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, alpha: float = 1.0
) -> None:
    """target[t] += alpha · inputs[t] @ weights[index of t].T for every token t with an adapter."""
    num_tokens = target.shape[0]
    if num_tokens <= GATHER_MAX_TOKENS:
        target.add_(_per_token(inputs[:num_tokens], weights, indices[:num_tokens]).to(target.dtype), alpha=alpha)
        return
    for index, rows in _GROUPS.of(indices):
        w = weights[index].to(target.dtype)  # [out, in]
        if isinstance(rows, slice):
            target[rows].addmm_(inputs[rows], w.T, alpha=alpha)  # a view: in place
        else:
            target[rows] += alpha * (inputs[rows] @ w.T)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    weights = _squeeze(lora_b_weights)  # [L, out, r]
    inputs = inputs.to(output_tensor.dtype)  # [T, r]
    common = min(weights.shape[1], output_tensor.shape[1])
    if not add_inputs:
        output_tensor[:, :common] = 0
    limit = output_tensor.shape[0]
    _add_products(output_tensor[:, :common], inputs, weights[:, :common], lora_indices_tensor[:limit])


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs: bool = True
):
    weights = _squeeze(lora_b_weights)  # [L, slice_size, r]
    inputs = inputs.to(output_tensor.dtype)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]  # view
    if not add_inputs:
        target.zero_()
    _add_products(target, inputs, weights, lora_indices_tensor)


def _token_indices(lora_indices_tensor, seq_len_tensor):
    return torch.repeat_interleave(lora_indices_tensor, seq_len_tensor)


def sgmv_shrink(inputs, lora_a_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, scaling):
    bgmv_shrink(inputs, lora_a_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor), scaling)


def sgmv_expand(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                batches, max_seq_length, token_nums, add_inputs=False):
    bgmv_expand(inputs, lora_b_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor), add_inputs)


def sgmv_expand_slice(inputs, lora_b_weights, output_tensor, b_seq_start_loc, seq_len_tensor, lora_indices_tensor,
                      batches, max_seq_length, token_nums, slice_offset, slice_size, add_inputs=False):
    bgmv_expand_slice(
        inputs, lora_b_weights, output_tensor, _token_indices(lora_indices_tensor, seq_len_tensor),
        slice_offset, slice_size, add_inputs,
    )


_REPLACEMENTS = {
    "bgmv_shrink": bgmv_shrink,
    "bgmv_expand": bgmv_expand,
    "bgmv_expand_slice": bgmv_expand_slice,
    "sgmv_shrink": sgmv_shrink,
    "sgmv_expand": sgmv_expand,
    "sgmv_expand_slice": sgmv_expand_slice,
}


def _agrees_with_stock(stock) -> bool:
    """Compare each replacement with the stock op on random data (every token has an adapter, as the
    stock op reads the last slot for index −1)."""
    g = torch.Generator().manual_seed(0)
    num_loras, rank, d_in, d_out, seq_lens = 3, 8, 24, 40, torch.tensor([3, 5, 2])
    tokens = int(seq_lens.sum())
    seq_loras = torch.tensor([2, 0, 2])
    token_loras = torch.repeat_interleave(seq_loras, seq_lens)
    a = torch.randn(num_loras, 1, rank, d_in, generator=g)
    b = torch.randn(num_loras, 1, d_out, rank, generator=g)
    x = torch.randn(tokens, d_in, generator=g)
    h = torch.randn(tokens, rank, generator=g)
    base = torch.randn(tokens, d_out + 6, generator=g)
    meta = (torch.tensor([0, 3, 8]), seq_lens, seq_loras, 3, 5, tokens)
    cases = [
        ("sgmv_shrink", lambda f, out: f(x, a, out, *meta, 0.5), torch.zeros(tokens, rank)),
        ("bgmv_shrink", lambda f, out: f(x, a, out, token_loras, 0.5), torch.zeros(tokens, rank)),
        ("sgmv_expand", lambda f, out: f(h, b, out, *meta, True), base),
        ("bgmv_expand", lambda f, out: f(h, b, out, token_loras, True), base),
        ("sgmv_expand_slice", lambda f, out: f(h, b, out, *meta, 3, d_out, True), base),
        ("bgmv_expand_slice", lambda f, out: f(h, b, out, token_loras, 3, d_out, True), base),
    ]
    global GATHER_MAX_TOKENS
    gather_max_tokens = GATHER_MAX_TOKENS
    try:
        for GATHER_MAX_TOKENS in (tokens, 0):  # both paths: gathered per token, grouped by adapter
            for name, call, initial in cases:
                expected, actual = initial.clone(), initial.clone()
                call(getattr(stock, name), expected)
                call(_REPLACEMENTS[name], actual)
                if not torch.allclose(expected, actual, rtol=1e-5, atol=1e-5):
                    log.warning("grouped LoRA op %s disagrees with vLLM's; keeping the stock CPU ops", name)
                    return False
    finally:
        GATHER_MAX_TOKENS = gather_max_tokens
    return True


def install() -> bool:
    """Swap the grouped ops into vLLM's CPU punica wrapper if they agree with the stock ones."""
    try:
        from vllm.lora.ops import torch_ops as stock
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    if getattr(punica_cpu, "_zoserve_grouped_ops", False):
        return True
    if not _agrees_with_stock(stock):
        return False
    for name, fn in _REPLACEMENTS.items():
        if hasattr(punica_cpu, name):
            setattr(punica_cpu, name, fn)
    punica_cpu._zoserve_grouped_ops = True
    return True
