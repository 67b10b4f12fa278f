"""Local pre-training: schedule, data framing, determinism and the cache key, on a toy model and corpus."""

from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from scheduler.models.pretrain import PRETRAINED, PretrainSpec, lr_at, packed_blocks, pretrain, resolve_spec
from scheduler.models.tiny import TinyModelSpec

TOY = PretrainSpec(
    TinyModelSpec("toy", "opt", 32, 1, 2, 64, 384, 384, max_positions=64, seed=3),
    num_steps=12,
    batch_size=4,
    block_len=32,
    lr=1e-2,
    warmup_steps=3,
)
WORDS = "the a movie film was is great terrible good bad not very it this story acting fun dull".split()
CORPUS = [" ".join(WORDS[(i * 7 + j * 3) % len(WORDS)] for j in range(3 + i % 6)) for i in range(400)]


def test_lr_warms_up_then_decays_to_the_floor():
    lrs = [lr_at(TOY, step) for step in range(TOY.num_steps)]
    assert lrs[0] == pytest.approx(TOY.lr / 3) and lrs[2] == pytest.approx(TOY.lr)
    assert all(a >= b for a, b in zip(lrs[2:], lrs[3:]))
    assert lrs[-1] == pytest.approx(TOY.lr * TOY.min_lr_ratio)


def test_packed_blocks_are_seeded_and_keep_every_sentence_in_order():
    sentences = [[2, 10 + i, 11 + i] for i in range(50)]
    take = lambda seed: [b for _, b in zip(range(10), packed_blocks(sentences, 8, seed))]  # noqa: E731
    assert take(0) == take(0) and take(0) != take(1)
    assert all(len(b) == 8 for b in take(0))
    stream = [t for b in take(0) for t in b]
    starts = [i for i, t in enumerate(stream) if t == 2]
    for i in starts[:-1]:  # each BOS is followed by one whole sentence
        assert stream[i + 2] == stream[i + 1] + 1


def test_fewer_steps_is_a_different_cache_entry():
    full = PRETRAINED["sst2-opt"]
    assert resolve_spec("sst2-opt") == full
    toy = resolve_spec("sst2-opt", num_steps=10)
    assert toy.num_steps == 10 and toy.fingerprint() != full.fingerprint()
    with pytest.raises(KeyError):
        resolve_spec("no-such-model")


def test_pretraining_learns_and_is_deterministic(tmp_path):
    first = pretrain(TOY, tmp_path / "a", CORPUS, CORPUS[:40], log=lambda _: None)
    second = pretrain(TOY, tmp_path / "b", CORPUS, CORPUS[:40], log=lambda _: None)
    weights_a = load_file(tmp_path / "a" / "model.safetensors")
    weights_b = load_file(tmp_path / "b" / "model.safetensors")
    assert all((weights_a[k] == weights_b[k]).all() for k in weights_a)
    assert first.train_loss == second.train_loss and first.dev_loss == second.dev_loss
    # A uniform guess over the 384-token vocabulary costs ln 384 ≈ 5.95 nats.
    assert first.dev_loss < 5.0
    saved = json.loads((tmp_path / "a" / "zoserve_pretrain.json").read_text())
    assert saved["report"]["num_steps"] == TOY.num_steps and saved["spec"]["model"]["name"] == "toy"
