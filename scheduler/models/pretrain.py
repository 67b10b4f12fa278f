"""A small OPT model pre-trained locally with ordinary backprop on unlabelled SST-2 sentences.

Models cannot be downloaded here, and a randomly initialised model gives ZO nothing to start from: ZO
fine-tuning (MeZO, LoZO, …) only steers what pre-training already put into the model. So this module builds
the model and tokenizer with `tiny.build_model_dir` (BPE trained on the same sentences, seeded init) and then
trains it as a causal language model on the SST-2 *train sentences only*: the labels are never read, and the
dev sentences are used only to report a held-out LM loss.

Deterministic from `PretrainSpec` (for a fixed torch build and thread count): the sentence order of every
epoch is a seeded shuffle, the init is tiny.py's forked-RNG init, and there is no dropout. The result is
cached under `<cache>/models/<name>-<fingerprint>` (atomic rename), with `zoserve_pretrain.json` beside the
weights saying how it was trained and what LM loss it reached.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from scheduler.models.tiny import TinyModelSpec, build_model_dir, default_cache_dir, default_corpus_path, read_corpus

_PRETRAIN_VERSION = "1"
_ALL_LINES = 10**7


@dataclass(frozen=True)
class PretrainSpec:
    model: TinyModelSpec
    num_steps: int
    batch_size: int  # packed blocks per optimiser step
    block_len: int  # tokens per packed block
    lr: float
    warmup_steps: int
    min_lr_ratio: float = 0.1  # cosine decay ends at lr·min_lr_ratio
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0  # sentence order; the init seed is model.seed

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob + _PRETRAIN_VERSION.encode()).hexdigest()[:12]

    @property
    def num_tokens(self) -> int:
        return self.num_steps * self.batch_size * self.block_len


@dataclass(frozen=True)
class PretrainReport:
    num_steps: int
    num_tokens: int
    num_epochs: float
    train_loss: float  # mean LM loss over the last 20 steps
    dev_loss: float  # LM loss on the SST-2 dev sentences (held out)
    duration_s: float
    num_threads: int


# A ~6M-parameter OPT (hidden 256, 4 layers, vocab 8192, tied LM head): on the 2-core CPU it trains on
# ~2 epochs of SST-2 (≈1.8M tokens) in ≤15 minutes. Wider or deeper models saw under one epoch in that time
# and learned less. A vocabulary of 8192 keeps " great" and " terrible" single tokens.
PRETRAINED: dict[str, PretrainSpec] = {
    "sst2-opt": PretrainSpec(
        TinyModelSpec("sst2-opt", "opt", 256, 4, 4, 1024, 8192, 8192, max_positions=256, seed=0),
        num_steps=450,
        batch_size=32,
        block_len=128,
        lr=2e-3,
        warmup_steps=30,
    ),
}


def packed_blocks(sentences: list[list[int]], block_len: int, seed: int) -> Iterator[list[int]]:
    """Endless blocks of `block_len` token ids: each epoch a seeded shuffle of the sentences, concatenated.

    Each sentence starts with OPT's BOS (= EOS, `</s>`), so a block reads "… </s> sentence </s> sentence …",
    the same framing a scoring prompt has.
    """
    buffer: list[int] = []
    for epoch in range(_ALL_LINES):
        order = list(range(len(sentences)))
        random.Random(f"zoserve-pretrain:{seed}:{epoch}").shuffle(order)
        for index in order:
            buffer.extend(sentences[index])
            while len(buffer) >= block_len:
                yield buffer[:block_len]
                buffer = buffer[block_len:]


def lr_at(spec: PretrainSpec, step: int) -> float:
    """Linear warm-up, then cosine decay to lr·min_lr_ratio at the last step."""
    if step < spec.warmup_steps:
        return spec.lr * (step + 1) / spec.warmup_steps
    progress = min(1.0, (step - spec.warmup_steps) / max(1, spec.num_steps - 1 - spec.warmup_steps))
    return spec.lr * (spec.min_lr_ratio + (1 - spec.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _encode(tokenizer, texts: list[str]) -> list[list[int]]:
    return [ids for ids in tokenizer(texts).input_ids if len(ids) > 1]


@torch.no_grad()
def lm_loss(model, sentences: list[list[int]], batch_size: int = 64) -> float:
    """Mean next-token loss over the tokens of `sentences` (each scored on its own, right-padded)."""
    total, count = 0.0, 0
    for start in range(0, len(sentences), batch_size):
        chunk = sentences[start : start + batch_size]
        width = max(len(s) for s in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long)  # [N, L]
        mask = torch.zeros((len(chunk), width), dtype=torch.long)  # [N, L]
        for row, s in enumerate(chunk):
            ids[row, : len(s)] = torch.tensor(s)
            mask[row, : len(s)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()  # [N, L-1, V]
        targets = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)  # [N, L-1]
        loss = torch.nn.functional.cross_entropy(logits.transpose(1, 2), targets, reduction="sum", ignore_index=-100)
        total += float(loss)
        count += int((targets != -100).sum())
    return total / max(1, count)


def pretrain(
    spec: PretrainSpec,
    out_dir: Path,
    corpus: list[str],
    dev_texts: list[str],
    log: Callable[[str], None] = print,
) -> PretrainReport:
    """Build `spec.model` into `out_dir` and train it in place as a causal LM on `corpus`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_model_dir(spec.model, out_dir, corpus)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    model = AutoModelForCausalLM.from_pretrained(out_dir, dtype=torch.float32)
    # eval(): no dropout. A couple of epochs is the under-fitting regime, where dropout only slows learning.
    model.eval()
    sentences = _encode(tokenizer, corpus)
    num_corpus_tokens = sum(len(s) for s in sentences)
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.ndim < 2]
    optimiser = torch.optim.AdamW(
        [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=spec.lr,
        betas=(0.9, 0.95),
    )
    blocks = packed_blocks(sentences, spec.block_len, spec.seed)
    recent: list[float] = []
    started = time.perf_counter()
    for step in range(spec.num_steps):
        batch = torch.tensor([next(blocks) for _ in range(spec.batch_size)])  # [B, T]
        for group in optimiser.param_groups:
            group["lr"] = lr_at(spec, step)
        loss = model(input_ids=batch, labels=batch).loss
        optimiser.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), spec.max_grad_norm)
        optimiser.step()
        recent = (recent + [loss.item()])[-20:]
        if step % 25 == 0 or step == spec.num_steps - 1:
            elapsed = time.perf_counter() - started
            log(f"pretrain step {step + 1}/{spec.num_steps} loss {sum(recent) / len(recent):.3f} ({elapsed:.0f} s)")
    duration_s = time.perf_counter() - started
    dev_loss = lm_loss(model, _encode(tokenizer, dev_texts))
    model.save_pretrained(out_dir, safe_serialization=True)
    report = PretrainReport(
        num_steps=spec.num_steps,
        num_tokens=spec.num_tokens,
        num_epochs=spec.num_tokens / max(1, num_corpus_tokens),
        train_loss=sum(recent) / max(1, len(recent)),
        dev_loss=dev_loss,
        duration_s=duration_s,
        num_threads=torch.get_num_threads(),
    )
    (out_dir / "zoserve_pretrain.json").write_text(json.dumps({"spec": asdict(spec), "report": asdict(report)}, indent=2))
    return report


def _dev_texts(corpus_path: Path) -> list[str]:
    dev = corpus_path.with_name("dev.tsv")
    return read_corpus(dev, max_lines=_ALL_LINES) if dev.exists() else []


def resolve_spec(name: str, num_steps: int | None = None) -> PretrainSpec:
    """The registered spec `name`, optionally with fewer steps (a toy run: its own fingerprint and cache entry)."""
    if name not in PRETRAINED:
        raise KeyError(f"unknown pre-trained model {name!r}; known: {sorted(PRETRAINED)}")
    spec = PRETRAINED[name]
    if num_steps is not None and num_steps != spec.num_steps:
        spec = dataclasses.replace(spec, num_steps=num_steps, warmup_steps=min(spec.warmup_steps, max(1, num_steps // 10)))
    return spec


def load_report(model_dir: Path) -> PretrainReport:
    return PretrainReport(**json.loads((model_dir / "zoserve_pretrain.json").read_text())["report"])


def ensure_pretrained_model(
    name: str,
    cache_dir: Path | None = None,
    *,
    num_steps: int | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Path of the pre-trained model `name`, training it once into the cache if missing."""
    spec = resolve_spec(name, num_steps)
    cache_dir = cache_dir or default_cache_dir()
    final = cache_dir / "models" / f"{name}-{spec.fingerprint()}"
    if (final / "zoserve_pretrain.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        corpus_path = default_corpus_path()
        pretrain(spec, staging, read_corpus(corpus_path, max_lines=_ALL_LINES), _dev_texts(corpus_path), log)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "zoserve_pretrain.json").exists():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
