"""The dense LoRA pass over a step's adapters (engine/cpu_lora_dense.py) adds what vLLM's own per-slice
`add_lora_linear` adds, gives adapter-less tokens nothing, never reuses a stale mask, and hands steps with
many adapters back to the per-slice ops."""

import pytest
import torch

from scheduler.engine import cpu_lora_dense


@pytest.fixture
def stock(monkeypatch):
    """vLLM's own method, in place on the class for the test (importing the worker extension anywhere in
    this process installs the dense pass)."""
    from vllm.lora.punica_wrapper.punica_cpu import PunicaWrapperCPU

    method = PunicaWrapperCPU.add_lora_linear
    method = getattr(method, "__wrapped_stock__", method)
    monkeypatch.setattr(PunicaWrapperCPU, "add_lora_linear", method)
    return PunicaWrapperCPU, method


def _layer(g, num_slots=6, rank=4, d_in=10, sizes=(7, 7, 5), zero_middle=True):
    lora_a = tuple(torch.randn(num_slots, 1, rank, d_in, generator=g) for _ in sizes)
    lora_b = tuple(torch.randn(num_slots, 1, size, rank, generator=g) for size in sizes)
    if zero_middle:  # the k slice of qkv_proj under q/v targets
        lora_a[1].zero_()
        lora_b[1].zero_()
    return lora_a, lora_b, sizes


def _per_token(base, x, indices, lora_a, lora_b, scale, sizes):
    """The definition: each token with a slot gets scale · x A^T B^T of its own slot in every slice."""
    expected = base.clone()
    for t, slot in enumerate(indices.tolist()):
        if slot < 0:
            continue
        offset = 0
        for a, b, size in zip(lora_a, lora_b, sizes):
            expected[t, offset : offset + size] += scale * (x[t] @ a[slot, 0].T) @ b[slot, 0].T
            offset += size
    return expected


def test_random_steps_match_vllms_add_lora_linear(stock):
    """Steps as vLLM builds them: requests of random lengths on random adapters in any order, prefill and
    decode, against vLLM's own method (every token has an adapter: vLLM's ops read the last slot for −1)."""
    wrapper_cls, method = stock
    g = torch.Generator().manual_seed(5)
    lora_a, lora_b, sizes = _layer(g)
    for trial in range(24):
        prefill = trial % 2 == 0
        lengths = torch.randint(1, 30 if prefill else 2, (int(torch.randint(1, 10, (1,), generator=g)),), generator=g)
        adapters = torch.randint(0, 6, (lengths.numel(),), generator=g)
        indices = torch.repeat_interleave(adapters, lengths)
        wrapper = cpu_lora_dense._wrapper_for(wrapper_cls, indices, prefill)
        x = torch.randn(indices.numel(), 10, generator=g)
        base = torch.randn(indices.numel(), sum(sizes), generator=g)
        expected, actual = base.clone(), base.clone()
        method(wrapper, expected, x, lora_a, lora_b, 0.75, sizes)
        assert cpu_lora_dense.add_lora_linear_dense(actual, x, wrapper.token_lora_indices, lora_a, lora_b, 0.75, sizes)
        assert torch.allclose(actual, expected, atol=1e-5), (trial, indices)


def test_tokens_without_an_adapter_get_nothing():
    g = torch.Generator().manual_seed(6)
    lora_a, lora_b, sizes = _layer(g, zero_middle=False)
    indices = torch.tensor([2, -1, 2, 0, -1, 5, 5])
    x = torch.randn(7, 10, generator=g)
    base = torch.randn(7, sum(sizes), generator=g)
    actual = base.clone()
    assert cpu_lora_dense.add_lora_linear_dense(actual, x, indices, lora_a, lora_b, 2.0, sizes)
    assert torch.equal(actual[1], base[1]) and torch.equal(actual[4], base[4])
    assert torch.allclose(actual, _per_token(base, x, indices, lora_a, lora_b, 2.0, sizes), atol=1e-5)
    untouched = base.clone()  # no adapter at all: nothing added
    assert cpu_lora_dense.add_lora_linear_dense(untouched, x, torch.full((7,), -1), lora_a, lora_b, 2.0, sizes)
    assert torch.equal(untouched, base)


def test_the_mask_follows_every_change_of_the_indices_and_the_scale():
    """The mask is cached across calls (every LoRA layer of a forward): the next forward's indices written
    in place into the same buffer (as vLLM does), another tensor, or another scale must never reuse it."""
    g = torch.Generator().manual_seed(7)
    lora_a, lora_b, sizes = _layer(g)
    buffer = torch.tensor([0, 0, 1, 1, 1, 3, -1, 3])
    cases = [
        (lambda: buffer, 0.5),
        (lambda: buffer, 0.5),  # the cached mask holds
        (lambda: buffer.copy_(torch.tensor([3, 3, 3, 0, 0, 1, 1, 1])), 0.5),  # same storage, new contents
        (lambda: buffer, 2.0),  # same indices, another scale
        (lambda: torch.tensor([4, 4, 2, 2, 2, 2, 0, 0]), 2.0),  # another tensor, other adapters
        (lambda: torch.tensor([4, 4, 2, 2, 2, 2, 0, 0]), 2.0),  # equal contents, another tensor
    ]
    for make, scale in cases:
        indices = make()
        x = torch.randn(8, 10, generator=g)
        base = torch.randn(8, sum(sizes), generator=g)
        actual = base.clone()
        assert cpu_lora_dense.add_lora_linear_dense(actual, x, indices, lora_a, lora_b, scale, sizes)
        assert torch.allclose(actual, _per_token(base, x, indices, lora_a, lora_b, scale, sizes), atol=1e-5), indices


def test_a_written_slot_counts_at_once_in_inference_mode():
    """vLLM writes slot buffers under inference mode (no version counter): a write into a slot that was all
    zeros must count in the very next call, with no cached weights in the way."""
    g = torch.Generator().manual_seed(8)
    with torch.inference_mode():
        lora_a = tuple(torch.zeros(3, 1, 4, 10) for _ in range(2))
        lora_b = tuple(torch.zeros(3, 1, 6, 4) for _ in range(2))
        indices = torch.tensor([0, 1, 1, 2])
        x = torch.randn(4, 10, generator=g)
        base = torch.randn(4, 12, generator=g)
        actual = base.clone()
        assert cpu_lora_dense.add_lora_linear_dense(actual, x, indices, lora_a, lora_b, 1.0, (6, 6))
        assert torch.equal(actual, base)
        lora_a[0][1, 0].copy_(torch.randn(4, 10, generator=g))
        lora_b[0][1, 0].copy_(torch.randn(6, 4, generator=g))
        actual = base.clone()
        assert cpu_lora_dense.add_lora_linear_dense(actual, x, indices, lora_a, lora_b, 1.0, (6, 6))
        assert torch.allclose(actual, _per_token(base, x, indices, lora_a, lora_b, 1.0, (6, 6)), atol=1e-5)
        assert torch.equal(actual[0], base[0]) and not torch.equal(actual[1], base[1])


def test_many_adapters_go_back_to_the_per_slice_ops(stock, monkeypatch):
    wrapper_cls, method = stock
    g = torch.Generator().manual_seed(9)
    lora_a, lora_b, sizes = _layer(g)
    assert cpu_lora_dense.install()  # verified with the default limit, then the limit lowered
    monkeypatch.setattr(cpu_lora_dense, "DENSE_MAX_ADAPTERS", 2)
    indices = torch.tensor([0, 1, 2, 2, 1, 0, 4])
    x = torch.randn(7, 10, generator=g)
    base = torch.randn(7, sum(sizes), generator=g)
    untouched = base.clone()
    assert not cpu_lora_dense.add_lora_linear_dense(untouched, x, indices, lora_a, lora_b, 1.0, sizes)
    assert torch.equal(untouched, base)
    # Installed, the method hands such a step to vLLM's own ops and still adds the right products.
    assert getattr(wrapper_cls.add_lora_linear, "zoserve_dense", False)
    assert cpu_lora_dense.install()  # a second install keeps the one patch
    assert wrapper_cls.add_lora_linear.__wrapped_stock__ is method
    wrapper = cpu_lora_dense._wrapper_for(wrapper_cls, indices, prefill=True)
    actual = base.clone()
    wrapper.add_lora_linear(actual, x, lora_a, lora_b, 1.0, sizes)
    assert torch.allclose(actual, _per_token(base, x, indices, lora_a, lora_b, 1.0, sizes), atol=1e-5)


def test_install_verifies_against_vllm_first(stock, monkeypatch):
    """A dense pass that disagrees with vLLM's method is never installed."""
    wrapper_cls, method = stock
    monkeypatch.setattr(cpu_lora_dense, "add_lora_linear_dense", lambda y, *args: (y.add_(1.0), True)[1])
    assert not cpu_lora_dense.install()
    assert wrapper_cls.add_lora_linear is method
