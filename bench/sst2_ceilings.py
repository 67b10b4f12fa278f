"""What the SST-2 learning setting can reach at all: reference points for `bench/sst2_learning.py`'s targets.

No engine and no ZO here; each figure is a dev accuracy (all 872 sentences) of something simpler or stronger
than a ZO fine-tune of the pre-trained `sst2-opt`, on the same 1,000 labelled examples:

- `bow_1000`: logistic regression on binary word features of the 1,000 examples, for several L2 strengths.
  The best of them is picked *on dev*, so it is an optimistic ceiling of plain supervised learning from those
  labels. `bow_full`: the same on all 67,349 labelled train phrases (what more labels would give).
- `verbalizer_cooccurrence`: how much label-word signal the *unlabelled* train sentences carry. Every word
  gets a semantic orientation from how often it shares a sentence with the positive vs the negative label
  words (log ratio of co-occurrence rates); a dev sentence is positive when its words' orientations sum > 0.
  A language model's zero-shot "<sentence> it was great / terrible" learns from these same co-occurrences.
- `feature_probe`: logistic regression on the pre-trained model's final hidden states of the 1,000 prompts
  (`<sentence> it was`): at the last position (where the verbalizer is scored) and averaged over the prompt;
  `feature_probe_random_init` the same for the untrained model of the same shape. A LoRA fine-tune, first- or
  zeroth-order, reads its answer out of these features.

    .venv/bin/python bench/sst2_ceilings.py --json
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402

from scheduler.datasets import load_sst2  # noqa: E402
from scheduler.models.pretrain import ensure_pretrained_model  # noqa: E402
from scheduler.objectives import LabelledText  # noqa: E402
from sst2_learning import OBJECTIVE, training_examples  # noqa: E402

L2_STRENGTHS = (1e-4, 1e-3, 1e-2, 1e-1)
LABEL_WORD_SETS = {
    "great/terrible": ({"great"}, {"terrible"}),  # the benchmark's verbalizers
    "good/bad": ({"good"}, {"bad"}),
    "six seeds each": (
        {"great", "good", "best", "excellent", "wonderful", "beautiful"},
        {"bad", "terrible", "worst", "awful", "boring", "dull"},
    ),
}


def words(text: str) -> set[str]:
    return set(re.findall(r"[a-z']+", text.lower()))


def labels(examples: Sequence[LabelledText]) -> torch.Tensor:
    return torch.tensor([float(ex.label) for ex in examples])


def logistic_accuracy(
    x_train: torch.Tensor, y_train: torch.Tensor, x_dev: torch.Tensor, y_dev: torch.Tensor, l2: float
) -> float:
    """Dev accuracy of an L2-regularised logistic regression fitted by L-BFGS (full batch, deterministic)."""
    w = torch.zeros(x_train.shape[1], requires_grad=True)
    b = torch.zeros(1, requires_grad=True)
    optimiser = torch.optim.LBFGS([w, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        optimiser.zero_grad()
        logits = x_train @ w + b
        loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y_train) + l2 * (w * w).sum()
        loss.backward()
        return loss

    optimiser.step(closure)
    with torch.no_grad():
        return float((((x_dev @ w + b) > 0).float() == y_dev).float().mean())


def bag_of_words(train: Sequence[LabelledText], dev: Sequence[LabelledText], strengths) -> dict[str, float]:
    vocab = {w: i for i, w in enumerate(sorted({w for ex in train for w in words(ex.text)}))}

    def features(examples):
        x = torch.zeros(len(examples), len(vocab))
        for row, ex in enumerate(examples):
            for w in words(ex.text):
                if w in vocab:
                    x[row, vocab[w]] = 1.0
        return x

    x_train, x_dev = features(train), features(dev)
    return {f"{l2:g}": logistic_accuracy(x_train, labels(train), x_dev, labels(dev), l2) for l2 in strengths}


def cooccurrence_orientation(corpus: Sequence[str], dev: Sequence[LabelledText], positive: set, negative: set) -> dict:
    sentences = [words(text) for text in corpus]
    doc_freq = Counter(w for s in sentences for w in s)
    with_pos = [s for s in sentences if s & positive]
    with_neg = [s for s in sentences if s & negative]
    pos_counts, neg_counts = Counter(w for s in with_pos for w in s), Counter(w for s in with_neg for w in s)
    orientation = {
        w: math.log((pos_counts[w] + 0.5) / len(with_pos)) - math.log((neg_counts[w] + 0.5) / len(with_neg))
        for w in doc_freq
        if doc_freq[w] >= 3 and w not in positive | negative
    }
    correct = sum((sum(orientation.get(w, 0.0) for w in words(ex.text)) > 0) == (ex.label == 1) for ex in dev)
    return {"accuracy": correct / len(dev), "sentences_with_positive": len(with_pos), "sentences_with_negative": len(with_neg)}


@torch.no_grad()
def prompt_features(model, tokenizer, examples: Sequence[LabelledText]) -> tuple[torch.Tensor, torch.Tensor]:
    """(last-position, prompt-mean) final hidden states of each example's scoring prompt."""
    last, mean = [], []
    for ex in examples:
        ids = tokenizer(OBJECTIVE.template.format(text=ex.text)).input_ids[:128]
        hidden = model(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0]  # [L, H]
        last.append(hidden[-1])
        mean.append(hidden.mean(0))
    return torch.stack(last), torch.stack(mean)


def standardised(train: torch.Tensor, dev: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    centre, scale = train.mean(0), train.std(0) + 1e-6
    return (train - centre) / scale, (dev - centre) / scale


def feature_probe(model, tokenizer, train, dev, strengths) -> dict[str, dict[str, float]]:
    train_feats, dev_feats = prompt_features(model, tokenizer, train), prompt_features(model, tokenizer, dev)
    out = {}
    for name, x_train, x_dev in zip(("last_position", "prompt_mean"), train_feats, dev_feats):
        x_train, x_dev = standardised(x_train, x_dev)
        out[name] = {f"{l2:g}": logistic_accuracy(x_train, labels(train), x_dev, labels(dev), l2) for l2 in strengths}
    return out


def best(figures: dict) -> float:
    return max(v if isinstance(v, float) else best(v) for v in figures.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sst2-opt")
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    train, dev, corpus = training_examples(args.num_train, 0), load_sst2("dev"), load_sst2("train")
    model_dir = ensure_pretrained_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    pretrained = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    untrained = AutoModelForCausalLM.from_config(pretrained.config).eval()
    result = {
        "benchmark": "sst2_ceilings",
        "model": str(model_dir),
        "num_train": len(train),
        "num_dev": len(dev),
        "bow_1000": bag_of_words(train, dev, L2_STRENGTHS),
        "bow_full": bag_of_words(corpus, dev, (1e-5, 1e-4)),
        "verbalizer_cooccurrence": {
            name: cooccurrence_orientation([ex.text for ex in corpus], dev, pos, neg)
            for name, (pos, neg) in LABEL_WORD_SETS.items()
        },
        "feature_probe": feature_probe(pretrained, tokenizer, train, dev, L2_STRENGTHS),
        "feature_probe_random_init": feature_probe(untrained, tokenizer, train, dev, L2_STRENGTHS),
    }
    result["best"] = {
        "bow_1000": best(result["bow_1000"]),
        "bow_full": best(result["bow_full"]),
        "verbalizer_cooccurrence": max(v["accuracy"] for v in result["verbalizer_cooccurrence"].values()),
        "feature_probe": best(result["feature_probe"]),
        "feature_probe_random_init": best(result["feature_probe_random_init"]),
    }
    for name, value in result["best"].items():
        print(f"{name:28s} {value:.3f}")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
