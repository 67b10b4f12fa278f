"""Grouped LoRA shrink/expand for vLLM's CPU punica wrapper.

vLLM 0.32's CPU path (`vllm.lora.ops.torch_ops`) gathers one LoRA weight matrix per token
(`weights[indices]` → [tokens, out, r]) and runs an einsum: for a ZO batch of ~1k tokens this moves
gigabytes per forward although the batch holds only a handful of distinct adapters. These drop-ins compute
the same products with one GEMM per long run of one adapter's tokens and per adapter for the rest (gathered,
sorted by adapter), and give tokens without an adapter (index −1) no LoRA contribution instead of reading the last slot.

`install()` checks every replacement against the stock op on random inputs first and leaves vLLM untouched
if any differs; it runs in the worker process (imported by the worker extension).
"""

from __future__ import annotations

import itertools
import logging
import weakref

import torch

log = logging.getLogger(__name__)


def slot_matrices(weights: torch.Tensor) -> torch.Tensor:
    """A stacked slot buffer as one matrix per slot: [L, 1, out, in] (vLLM's layout) → [L, out, in]."""
    return weights.squeeze(1) if weights.dim() == 4 else weights  # [L, out, in]


class _Plan:
    """How one forward's tokens split by adapter. `runs`: long runs of one adapter's tokens, each an in-place
    GEMM on a view of the batch (no gather, no scatter). The other tokens with an adapter: `rows`, sorted by
    adapter (stable), with `groups` each adapter's slice of that order: one gather of their inputs, one GEMM
    per adapter, one scatter-add of the products."""

    def __init__(self, runs: list[tuple[int, slice]], rows: torch.Tensor | None, groups: list[tuple[int, slice]]):
        self.runs = runs
        self.rows = rows
        self.groups = groups


class _Plans:
    """Every LoRA layer of a forward gets the same token → adapter indices, so the plan is cached against a
    copy of the last index vector; one `torch.equal` per call decides whether it still holds.

    One adapter's tokens often come in several runs: two jobs' probe chunks enter in turn, decode tokens of
    different users interleave, and vLLM's model runner seats new requests in free rows of its persistent
    batch. Gathering and scattering each adapter's rows on its own took 13 % of the worker (py-spy, together
    phase); a GEMM per run pays an op per run, which only long runs repay."""

    def __init__(self) -> None:
        self._key: torch.Tensor | None = None
        self._min_run = -1
        self._plan = _Plan([], None, [])

    def of(self, indices: torch.Tensor) -> _Plan:
        key = self._key
        stale = key is None or key.shape != indices.shape or self._min_run != MIN_RUN_TOKENS
        if stale or not torch.equal(key, indices):
            self._plan = self._compute(indices)
            self._key, self._min_run = indices.clone(), MIN_RUN_TOKENS
        return self._plan

    @staticmethod
    def _compute(indices: torch.Tensor) -> _Plan:
        num_tokens = indices.numel()
        if num_tokens == 0:
            return _Plan([], None, [])
        starts = [0, *((indices[1:] != indices[:-1]).nonzero(as_tuple=True)[0] + 1).tolist()]
        runs, short = [], []
        for index, start, end in zip(indices[starts].tolist(), starts, [*starts[1:], num_tokens]):
            if index < 0:
                continue
            if end - start >= MIN_RUN_TOKENS:
                runs.append((index, slice(start, end)))
            else:
                short.append((index, start, end))
        if not short:
            return _Plan(runs, None, [])
        short.sort(key=lambda run: run[0])  # stable: by adapter, then batch order
        rows = torch.cat([torch.arange(start, end) for _, start, end in short])
        groups: list[tuple[int, slice]] = []
        offset = 0
        for index, members in itertools.groupby(short, key=lambda run: run[0]):
            size = sum(end - start for _, start, end in members)
            groups.append((index, slice(offset, offset + size)))
            offset += size
        return _Plan(runs, rows, groups)


_PLANS = _Plans()


class _ZeroWeights:
    """Whether a stacked slot buffer holds nothing but zeros: the slice of a packed layer that no adapter
    trains (OPT's and Llama's `qkv_proj` under q_proj/v_proj targets carries a k slice of zeros in every
    slot), whose shrink and expand add nothing. The answer is kept per buffer object (vLLM passes the same
    stacked tensors on every call) against its version counter, which every in-place write bumps (a slot
    update, a probe write, through any view); a tensor without a counter (inference mode) is checked each call."""

    def __init__(self) -> None:
        self._seen: dict[int, tuple[weakref.ref, int, bool]] = {}
        self.num_skipped = 0  # calls that found an all-zero buffer, for tests and debugging

    def __call__(self, weights: torch.Tensor) -> bool:
        try:
            version = weights._version
        except RuntimeError:  # inference tensors track no version
            version = None
        seen = self._seen.get(id(weights))
        if version is not None and seen is not None and seen[0]() is weights and seen[1] == version:
            zero = seen[2]
        else:
            zero = not bool(weights.any())
            if version is not None:
                self._seen[id(weights)] = (weakref.ref(weights), version, zero)
        self.num_skipped += zero
        return zero


_ZERO = _ZeroWeights()


def is_all_zero(weights: torch.Tensor) -> bool:
    """Whether a stacked slot buffer holds nothing but zeros (answered from its version when it has one)."""
    return _ZERO(weights)

# Up to this many tokens (decode steps of a few user requests), one gathered weight per token and a batched
# matrix-vector product cost less than a GEMM per adapter (measured on 2 cores: 12 tokens over 12 adapters,
# 0.18 ms per shrink+expand pair gathered vs 0.45 ms grouped).
GATHER_MAX_TOKENS = 32
# Runs of one adapter at least this long get a GEMM of their own on a view; shorter ones are gathered, sorted
# by adapter. Micro-benchmark (one thread, hidden 128, r 8, one shrink + expand pair; before this change):
# 8 runs of 128 tokens on 4 adapters 0.23 ms (0.56); 52 runs of 20 tokens 0.44 ms (0.60); 32 runs of 120
# tokens 0.75 ms (1.75).
MIN_RUN_TOKENS = 48


def _per_token(inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """inputs[t] @ weights[index of t].T for each token t, zero where index < 0. [T, out]"""
    w = weights.index_select(0, indices.clamp(min=0))  # [T, out, in]
    products = torch.bmm(w, inputs.unsqueeze(-1).to(w.dtype)).squeeze(-1)  # [T, out]
    return products.masked_fill_((indices < 0).unsqueeze(-1), 0.0)


def bgmv_shrink(inputs, lora_a_weights, output_tensor, lora_indices_tensor, scaling: float = 1.0):
    weights = slot_matrices(lora_a_weights)  # [L, r, in]
    rank = weights.shape[1]
    output_tensor[:, :rank] = 0
    if _ZERO(lora_a_weights):
        return
    _add_products(output_tensor[:, :rank], inputs.to(output_tensor.dtype), weights, lora_indices_tensor, scaling)


def _add_products(
    target: torch.Tensor, inputs: torch.Tensor, weights: torch.Tensor, indices: torch.Tensor, alpha: float = 1.0
) -> None:
    """target[t] += alpha · inputs[t] @ weights[index of t].T for every token t with an adapter."""
    num_tokens = target.shape[0]
    if num_tokens <= GATHER_MAX_TOKENS:
        target.add_(_per_token(inputs[:num_tokens], weights, indices[:num_tokens]).to(target.dtype), alpha=alpha)
        return
    plan = _PLANS.of(indices)
    for index, rows in plan.runs:
        target[rows].addmm_(inputs[rows], weights[index].to(target.dtype).T, alpha=alpha)  # a view: in place
    if plan.rows is None:
        return
    gathered = inputs.index_select(0, plan.rows)
    products = torch.empty(gathered.shape[0], target.shape[1], dtype=target.dtype)
    for index, rows in plan.groups:
        torch.mm(gathered[rows], weights[index].to(target.dtype).T, out=products[rows])
    target.index_add_(0, plan.rows, products, alpha=alpha)


def bgmv_expand(inputs, lora_b_weights, output_tensor, lora_indices_tensor, add_inputs: bool = True):
    weights = slot_matrices(lora_b_weights)  # [L, out, r]
    inputs = inputs.to(output_tensor.dtype)  # [T, r]
    common = min(weights.shape[1], output_tensor.shape[1])
    if not add_inputs:
        output_tensor[:, :common] = 0
    if _ZERO(lora_b_weights):
        return
    limit = output_tensor.shape[0]
    _add_products(output_tensor[:, :common], inputs, weights[:, :common], lora_indices_tensor[:limit])


def bgmv_expand_slice(
    inputs, lora_b_weights, output_tensor, lora_indices_tensor, slice_offset: int, slice_size: int, add_inputs: bool = True
):
    weights = slot_matrices(lora_b_weights)  # [L, slice_size, r]
    inputs = inputs.to(output_tensor.dtype)
    target = output_tensor[:, slice_offset : slice_offset + slice_size]  # view
    if not add_inputs:
        target.zero_()
    if _ZERO(lora_b_weights):
        return
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
    global GATHER_MAX_TOKENS, MIN_RUN_TOKENS
    saved = GATHER_MAX_TOKENS, MIN_RUN_TOKENS
    try:
        # Every path: gathered per token; runs of 5 as views with the rest sorted; everything sorted.
        for GATHER_MAX_TOKENS, MIN_RUN_TOKENS in ((tokens, 48), (0, 4), (0, tokens + 1)):
            for name, call, initial in cases:
                expected, actual = initial.clone(), initial.clone()
                call(getattr(stock, name), expected)
                call(_REPLACEMENTS[name], actual)
                if not torch.allclose(expected, actual, rtol=1e-5, atol=1e-5):
                    log.warning("grouped LoRA op %s disagrees with vLLM's; keeping the stock CPU ops", name)
                    return False
    finally:
        GATHER_MAX_TOKENS, MIN_RUN_TOKENS = saved
    return True


def installed() -> bool:
    try:
        from vllm.lora.punica_wrapper import punica_cpu
    except ImportError:
        return False
    return bool(getattr(punica_cpu, "_zoserve_grouped_ops", False))


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
