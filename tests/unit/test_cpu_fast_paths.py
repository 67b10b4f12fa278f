"""The vectorised per-step paths (engine/cpu_fast_paths.py) return exactly what vLLM's own functions return, and
are installed only where they do."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from vllm.lora.layers.utils import LoRAMapping
from vllm.lora.punica_wrapper import punica_base
from vllm.v1.sample.sampler import Sampler

from scheduler.engine import cpu_fast_paths

vllm_convert_mapping, VLLM_GATHER = cpu_fast_paths.vllm_originals()  # vLLM's own, even if installed already
assert vllm_convert_mapping.__module__ == "vllm.lora.punica_wrapper.utils"
assert VLLM_GATHER.__module__ == "vllm.v1.sample.sampler"

SLOTS = [None, 7, 3, None, 12, 5, None, None]  # slot index -> adapter id, as vLLM's LoRA manager keeps them


def _same(expected, actual) -> None:
    if expected is None:
        assert actual is None
        return
    assert actual.dtype == expected.dtype
    assert torch.equal(actual, expected)


def _random_mapping(rng: np.random.Generator, prefill: bool) -> LoRAMapping:
    requests = rng.choice([0, 7, 3, 12, 5], size=int(rng.integers(1, 60)))
    tokens = np.repeat(requests, rng.integers(1, 40 if prefill else 2, size=requests.size))
    return LoRAMapping(tokens.astype(np.int32), requests.astype(np.int32), is_prefill=prefill)


@pytest.mark.parametrize("seed", range(6))
def test_lora_mapping_matches_vllms_on_random_steps(seed):
    rng = np.random.default_rng(seed)
    for prefill in (True, False):
        mapping = _random_mapping(rng, prefill)
        expected = vllm_convert_mapping(mapping, SLOTS, 9, 2048, torch.device("cpu"))
        actual = cpu_fast_paths.convert_mapping(mapping, SLOTS, 9, 2048, torch.device("cpu"))
        assert actual[4] == expected[4]
        for want, got in zip(expected[:4], actual[:4]):
            _same(want, got)


def test_lora_mapping_of_tokens_without_an_adapter_and_of_an_unknown_adapter():
    no_adapter = LoRAMapping((0, 0, 7, 0), (0, 7, 0), is_prefill=True)
    base, sampler, padded, embeddings, lengths = cpu_fast_paths.convert_mapping(no_adapter, SLOTS, 9, 100, "cpu")
    assert base.tolist() == [-1, -1, 1, -1]
    assert embeddings.tolist() == [0, 0, 100, 0]
    assert sampler.tolist() == [-1, 1, -1]
    assert padded.tolist() == [0 + 8 * 3, 1 + 1 * 3, 2 + 8 * 3]
    assert lengths == [4, 3, 3, 4]
    unknown = LoRAMapping((7, 99), (7, 99), is_prefill=True)  # 99 holds no slot
    with pytest.raises(KeyError):
        vllm_convert_mapping(unknown, SLOTS, 9, 100, "cpu")
    with pytest.raises(KeyError):
        cpu_fast_paths.convert_mapping(unknown, SLOTS, 9, 100, "cpu")


@pytest.mark.parametrize("seed", range(4))
def test_chosen_logprobs_match_vllms(seed):
    g = torch.Generator().manual_seed(seed)
    sampler = Sampler()
    rows = int(torch.randint(1, 40, (1,), generator=g))
    logprobs = torch.randn(rows, 300, generator=g).log_softmax(-1)
    sampled = torch.randint(0, 300, (rows,), generator=g)
    chosen = {
        row: torch.randint(0, 300, (int(torch.randint(1, 4, (1,), generator=g)),), generator=g).tolist()
        for row in range(rows)
        if torch.rand(1, generator=g) < 0.7
    }
    expected = VLLM_GATHER(sampler, logprobs, chosen, sampled)
    actual = cpu_fast_paths.gather_specific_token_logprobs(sampler, logprobs, chosen, sampled)
    if not chosen:
        assert expected is None and actual is None
        return
    for want, got in zip(expected, actual):
        _same(want, got)


def test_no_chosen_ids_gather_nothing():
    assert cpu_fast_paths.gather_specific_token_logprobs(Sampler(), torch.zeros(2, 5), {}, torch.zeros(2, dtype=torch.long)) is None


@pytest.fixture
def stock_functions(monkeypatch):
    """vLLM's own functions in place, whatever an earlier test installed; restored afterwards."""
    monkeypatch.setattr(punica_base, "convert_mapping", vllm_convert_mapping)
    monkeypatch.setattr(Sampler, "gather_specific_token_logprobs", VLLM_GATHER)


def test_install_puts_both_in_place_once(stock_functions):
    assert cpu_fast_paths.installed() == []
    assert cpu_fast_paths.install() == ["lora_mapping", "logprob_token_ids"]
    assert punica_base.convert_mapping is cpu_fast_paths.convert_mapping
    assert Sampler.gather_specific_token_logprobs is cpu_fast_paths.gather_specific_token_logprobs
    assert cpu_fast_paths.install() == ["lora_mapping", "logprob_token_ids"]  # a second install changes nothing


def test_a_vllm_function_that_returns_something_else_is_kept(stock_functions, monkeypatch):
    """Should vLLM's own functions change what they return, the check keeps them (and the step stays right)."""

    def shifted_mapping(*args, **kwargs):
        base, sampler, padded, embeddings, lengths = vllm_convert_mapping(*args, **kwargs)
        return base + 1, sampler, padded, embeddings, lengths

    def failing_gather(self, logprobs, chosen, sampled):
        raise TypeError("a different signature")

    monkeypatch.setattr(punica_base, "convert_mapping", shifted_mapping)
    monkeypatch.setattr(Sampler, "gather_specific_token_logprobs", failing_gather)
    assert cpu_fast_paths.install() == []
    assert punica_base.convert_mapping is shifted_mapping
    assert Sampler.gather_specific_token_logprobs is failing_gather
