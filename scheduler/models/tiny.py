"""Small OPT- and Llama-architecture models and their tokenizers, built locally and deterministically.

Nothing is downloaded: the tokenizer is a byte-level BPE trained with the `tokenizers` library on a text
corpus (SST-2 sentences when available), and the weights are a seeded random initialisation of a
transformers config. The result is a plain Hugging Face directory that transformers, PEFT and vLLM load.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

_SPECIAL_OPT = {"bos": "</s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}
_SPECIAL_LLAMA = {"bos": "<s>", "eos": "</s>", "pad": "<pad>", "unk": "<unk>"}


@dataclass(frozen=True)
class TinyModelSpec:
    """Shape of a locally built model. `vocab_size` may exceed the tokenizer's vocabulary (padding rows)."""

    name: str
    architecture: str  # "opt" | "llama"
    hidden_size: int
    num_layers: int
    num_heads: int
    ffn_size: int
    vocab_size: int
    tokenizer_vocab_size: int
    max_positions: int = 512
    num_kv_heads: int | None = None  # llama only
    seed: int = 0

    def fingerprint(self) -> str:
        blob = json.dumps(asdict(self), sort_keys=True).encode()
        return hashlib.sha256(blob + _BUILDER_VERSION.encode()).hexdigest()[:12]


_BUILDER_VERSION = "1"

SPECS: dict[str, TinyModelSpec] = {
    spec.name: spec
    for spec in (
        # ~1M parameters: unit and integration tests.
        TinyModelSpec("tiny-opt", "opt", 128, 2, 4, 512, 2048, 2048),
        TinyModelSpec("tiny-llama", "llama", 128, 2, 4, 352, 2048, 2048, num_kv_heads=2),
        # The OPT-125m shape (random weights): throughput benchmarks.
        TinyModelSpec("opt-125m-shape", "opt", 768, 12, 12, 3072, 50272, 8192, max_positions=2048),
    )
}


def default_cache_dir() -> Path:
    return Path(os.environ.get("ZOSERVE_CACHE_DIR", Path.cwd() / ".cache" / "zoserve"))


def default_corpus_path() -> Path:
    data_dir = Path(os.environ.get("ZOSERVE_TASK_DATA_DIR", Path(__file__).resolve().parents[2] / ".." / "shared" / "data"))
    return data_dir / "sst2" / "train.tsv"


def read_corpus(path: Path | None = None, max_lines: int = 20000) -> list[str]:
    """SST-2 train sentences (text only), or a small built-in corpus when the data is not present."""
    path = path or default_corpus_path()
    if path.exists():
        with path.open(newline="") as f:
            rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            next(rows, None)
            return [row[0].strip() for _, row in zip(range(max_lines), rows) if row]
    words = "the a movie film was is great terrible good bad not very it this story acting fun dull".split()
    return [" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(8)) for i in range(2000)]


def build_tokenizer(spec: TinyModelSpec, corpus: list[str], out_dir: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = _SPECIAL_OPT if spec.architecture == "opt" else _SPECIAL_LLAMA
    # Fixed ids: OPT uses <s>=0 <pad>=1 </s>=2 <unk>=3; Llama <unk>=0 <s>=1 </s>=2 <pad>=3.
    ordered = ["<s>", "<pad>", "</s>", "<unk>"] if spec.architecture == "opt" else ["<unk>", "<s>", "</s>", "<pad>"]
    tok = Tokenizer(models.BPE(unk_token=special["unk"]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=spec.tokenizer_vocab_size,
        special_tokens=ordered,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(corpus, trainer=trainer)
    bos = special["bos"]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=special["bos"],
        eos_token=special["eos"],
        pad_token=special["pad"],
        unk_token=special["unk"],
        model_max_length=spec.max_positions,
    )
    fast.save_pretrained(out_dir)


def _config(spec: TinyModelSpec, tokenizer_dir: Path):
    from transformers import AutoTokenizer, LlamaConfig, OPTConfig

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    common = dict(
        vocab_size=spec.vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        max_position_embeddings=spec.max_positions,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        torch_dtype="float32",
    )
    if spec.architecture == "opt":
        return OPTConfig(ffn_dim=spec.ffn_size, word_embed_proj_dim=spec.hidden_size, do_layer_norm_before=True, **common)
    if spec.architecture == "llama":
        return LlamaConfig(
            intermediate_size=spec.ffn_size,
            num_key_value_heads=spec.num_kv_heads or spec.num_heads,
            tie_word_embeddings=False,
            **common,
        )
    raise ValueError(f"unknown architecture {spec.architecture!r}")


def build_model_dir(spec: TinyModelSpec, out_dir: Path, corpus: list[str] | None = None) -> Path:
    """Write tokenizer, config and seeded random weights of `spec` into `out_dir` (created)."""
    from transformers import AutoModelForCausalLM

    out_dir.mkdir(parents=True, exist_ok=True)
    build_tokenizer(spec, corpus if corpus is not None else read_corpus(), out_dir)
    config = _config(spec, out_dir)
    # Model init draws from the global RNG; fork it so the caller's RNG state is untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(out_dir, safe_serialization=True)
    (out_dir / "zoserve_spec.json").write_text(json.dumps(asdict(spec), indent=2))
    return out_dir


def ensure_model(name: str, cache_dir: Path | None = None) -> Path:
    """Path of the built model `name`, building it once into the cache (atomic rename) if missing."""
    if name not in SPECS:
        raise KeyError(f"unknown tiny model {name!r}; known: {sorted(SPECS)}")
    spec = SPECS[name]
    cache_dir = cache_dir or default_cache_dir()
    final = cache_dir / "models" / f"{name}-{spec.fingerprint()}"
    if (final / "zoserve_spec.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final.parent))
    try:
        build_model_dir(spec, staging)
        try:
            staging.rename(final)
        except OSError:
            if not (final / "zoserve_spec.json").exists():  # lost a race to nobody: real failure
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
