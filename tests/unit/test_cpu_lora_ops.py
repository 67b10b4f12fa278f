"""Grouped CPU LoRA ops equal vLLM's per-token ops, and give adapter-less tokens no LoRA contribution."""

import torch

from scheduler.engine import cpu_lora_ops


def test_grouped_ops_match_vllm_stock_ops():
    from vllm.lora.ops import torch_ops as stock

    assert cpu_lora_ops._agrees_with_stock(stock)


def test_tokens_without_adapter_get_nothing():
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
