"""The CPU LoRA ops (runs of one adapter as GEMMs, the rest per token) equal vLLM's per-token ops, and give
adapter-less tokens no LoRA contribution."""

import pytest
import torch

from scheduler.engine import cpu_lora_ops


def test_grouped_ops_match_vllm_stock_ops():
    from vllm.lora.ops import torch_ops as stock

    assert cpu_lora_ops._agrees_with_stock(stock)


PATHS = pytest.mark.parametrize(
    "gather_max_tokens,min_run_tokens",
    [(0, 0), (0, 2), (0, 10**6), (32, 48)],
    ids=["runs", "runs-and-sorted", "sorted", "gathered"],
)


@PATHS
def test_tokens_without_adapter_get_nothing(monkeypatch, gather_max_tokens, min_run_tokens):
    monkeypatch.setattr(cpu_lora_ops, "GATHER_MAX_TOKENS", gather_max_tokens)
    monkeypatch.setattr(cpu_lora_ops, "MIN_RUN_TOKENS", min_run_tokens)
    g = torch.Generator().manual_seed(1)
    a = torch.randn(2, 1, 4, 6, generator=g)  # [L, 1, r, in]
    x = torch.randn(5, 6, generator=g)
    indices = torch.tensor([1, 1, -1, 0, -1])
    out = torch.full((5, 4), 7.0)
    cpu_lora_ops.bgmv_shrink(x, a, out, indices, 2.0)
    assert torch.equal(out[2], torch.zeros(4)) and torch.equal(out[4], torch.zeros(4))
    assert torch.allclose(out[0], 2.0 * x[0] @ a[1, 0].T)
    assert torch.allclose(out[3], 2.0 * x[3] @ a[0, 0].T)
    base = torch.randn(5, 3, generator=g)
    b = torch.randn(2, 1, 3, 4, generator=g)
    expanded = base.clone()
    cpu_lora_ops.bgmv_expand(out, b, expanded, indices, True)
    assert torch.equal(expanded[2], base[2]) and torch.equal(expanded[4], base[4])
    assert torch.allclose(expanded[0], base[0] + out[0] @ b[1, 0].T)


def _stock_shrink(x, a, indices, scaling):
    """The per-token definition, with index −1 giving zero (what the grouped ops promise)."""
    out = torch.zeros(x.shape[0], a.shape[2])
    for t, index in enumerate(indices.tolist()):
        if index >= 0:
            out[t] = scaling * x[t] @ a[index, 0].T
    return out


def _expected_expand(base, h, b, indices):
    expected = base.clone()
    for t, index in enumerate(indices.tolist()):
        if index >= 0:
            expected[t] += h[t] @ b[index, 0].T
    return expected


@PATHS
def test_grouping_cache_follows_every_change_of_the_indices(monkeypatch, gather_max_tokens, min_run_tokens):
    """Every path (8 tokens: gathered per token; every run a GEMM on a view; runs of >= 2 as views and single
    tokens sorted; everything sorted). The plan is cached across calls (one per LoRA layer of a forward): a
    new forward's indices, written in place into the same buffer as vLLM does, or a different tensor, must
    never reuse a stale plan."""
    monkeypatch.setattr(cpu_lora_ops, "GATHER_MAX_TOKENS", gather_max_tokens)
    monkeypatch.setattr(cpu_lora_ops, "MIN_RUN_TOKENS", min_run_tokens)
    g = torch.Generator().manual_seed(2)
    a = torch.randn(3, 1, 4, 6, generator=g)
    x = torch.randn(8, 6, generator=g)
    buffer = torch.tensor([0, 0, 0, 1, 1, 2, 2, -1])  # contiguous runs: slices
    cases = [  # each made when its turn comes, so the in-place rewrite happens after the first forward
        lambda: buffer,
        lambda: buffer.copy_(torch.tensor([2, 2, 1, 1, 1, 0, 0, 0])),  # same storage, new contents (next forward)
        lambda: torch.tensor([1, 0, 1, 2, 0, -1, 1, 2]),  # interleaved: single-token runs
        lambda: torch.tensor([1, 1, 0, 2, 2, 1, 1, 0]),  # adapters 1 and 0 in two runs each
        lambda: torch.tensor([1, 0, 1, 2, 0, -1, 1, 2]),  # equal contents, another tensor: the cached plan holds
        lambda: torch.full((8,), -1),  # no adapter at all
    ]
    for make in cases:
        indices = make()
        out = torch.full((8, 4), 5.0)
        cpu_lora_ops.bgmv_shrink(x, a, out, indices, 0.5)
        assert torch.allclose(out, _stock_shrink(x, a, indices, 0.5), atol=1e-6), indices
        base = torch.randn(8, 3, generator=g)
        b = torch.randn(3, 1, 3, 4, generator=g)
        expanded = base.clone()
        cpu_lora_ops.bgmv_expand(out, b, expanded, indices, True)
        assert torch.allclose(expanded, _expected_expand(base, out, b, indices), atol=1e-6), indices


@pytest.mark.parametrize("min_run_tokens", [0, 3, 16, 10**6])
def test_random_batches_match_the_per_token_definition(monkeypatch, min_run_tokens):
    """Batches as vLLM builds them: requests of random lengths on random adapters (some without), in any
    order, so one adapter's tokens come in several runs, long and short."""
    monkeypatch.setattr(cpu_lora_ops, "GATHER_MAX_TOKENS", 0)
    monkeypatch.setattr(cpu_lora_ops, "MIN_RUN_TOKENS", min_run_tokens)
    g = torch.Generator().manual_seed(3)
    a = torch.randn(5, 1, 4, 6, generator=g)
    b = torch.randn(5, 1, 7, 4, generator=g)
    for _ in range(30):
        lengths = torch.randint(1, 40, (int(torch.randint(1, 12, (1,), generator=g)),), generator=g)
        adapters = torch.randint(-1, 5, (lengths.numel(),), generator=g)
        indices = torch.repeat_interleave(adapters, lengths)
        x = torch.randn(indices.numel(), 6, generator=g)
        out = torch.full((indices.numel(), 4), 3.0)
        cpu_lora_ops.bgmv_shrink(x, a, out, indices, 0.25)
        assert torch.allclose(out, _stock_shrink(x, a, indices, 0.25), atol=1e-5)
        base = torch.randn(indices.numel(), 10, generator=g)
        expanded = base.clone()
        cpu_lora_ops.bgmv_expand_slice(out, b, expanded, indices, 2, 7, True)
        expected = base.clone()
        expected[:, 2:9] = _expected_expand(base[:, 2:9], out, b, indices)
        assert torch.allclose(expanded, expected, atol=1e-5)


def test_an_all_zero_slot_buffer_is_skipped_until_a_slot_is_written(monkeypatch):
    """The k slice of a packed qkv layer under q/v targets is zeros in every slot: its shrink and expand
    are skipped. A write into any slot (in place, through a view, as slot updates and probe writes are)
    makes the buffer count again at once, and clearing it makes it skipped again."""
    monkeypatch.setattr(cpu_lora_ops, "GATHER_MAX_TOKENS", 0)
    g = torch.Generator().manual_seed(4)
    a = torch.zeros(3, 1, 4, 6)  # [L, 1, r, in]
    b = torch.zeros(3, 1, 5, 4)  # [L, 1, out, r]
    x = torch.randn(40, 6, generator=g)
    indices = torch.repeat_interleave(torch.tensor([0, 2, -1, 1]), torch.tensor([10, 12, 8, 10]))
    zero = cpu_lora_ops._ZERO
    for _ in range(2):  # the second call answers from the remembered version
        skipped = zero.num_skipped
        out = torch.full((40, 4), 9.0)
        cpu_lora_ops.bgmv_shrink(x, a, out, indices, 0.5)
        base = torch.randn(40, 7, generator=g)
        expanded = base.clone()
        cpu_lora_ops.bgmv_expand_slice(out, b, expanded, indices, 1, 5, True)
        assert torch.equal(out, torch.zeros(40, 4)) and torch.equal(expanded, base)
        assert zero.num_skipped == skipped + 2
    a[2, 0].copy_(torch.randn(4, 6, generator=g))  # one slot written, through a view
    b[2].copy_(torch.randn(1, 5, 4, generator=g))
    out = torch.full((40, 4), 9.0)
    cpu_lora_ops.bgmv_shrink(x, a, out, indices, 0.5)
    assert torch.allclose(out, _stock_shrink(x, a, indices, 0.5), atol=1e-6)
    assert out[10:22].abs().sum() > 0  # the written slot's tokens got their product
    base = torch.randn(40, 7, generator=g)
    expanded = base.clone()
    cpu_lora_ops.bgmv_expand_slice(out, b, expanded, indices, 1, 5, True)
    expected = base.clone()
    expected[:, 1:6] = _expected_expand(base[:, 1:6], out, b, indices)
    assert torch.allclose(expanded, expected, atol=1e-6)
    b.zero_()  # cleared again (a slot reset): skipped again
    skipped = zero.num_skipped
    cpu_lora_ops.bgmv_expand(out, b, base.clone(), indices, True)
    assert zero.num_skipped == skipped + 1


def test_the_zero_check_follows_writes_in_inference_mode():
    """vLLM builds and writes its slot buffers under inference mode, where tensors carry no version
    counter: the check must then look at the contents on every call."""
    with torch.inference_mode():
        a = torch.zeros(2, 1, 4, 6)
        x = torch.ones(8, 6)
        indices = torch.zeros(8, dtype=torch.long)
        out = torch.full((8, 4), 3.0)
        cpu_lora_ops.bgmv_shrink(x, a, out, indices, 1.0)
        assert torch.equal(out, torch.zeros(8, 4))
        a[0, 0].fill_(1.0)
        cpu_lora_ops.bgmv_shrink(x, a, out, indices, 1.0)
        assert torch.equal(out, torch.full((8, 4), 6.0))
