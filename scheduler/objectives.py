"""Scoring objectives: how examples become scoring sequences and how scores become a loss.

Pure code over token ids (the tokenizer is passed in): the engine path and the baseline loop build the same
sequences from the same examples and reduce the same scores, so they differ only in the forward pass.

- Classification (MeZO/LoZO on SST-2): prompt template + one verbalizer per class; per example the logit of
  class c is the mean log-prob of its option tokens, and the loss is cross-entropy over the classes.
  Single-token options use the cheap path (one sequence per example, candidates scored at the last position);
  multi-token options fall back to prompt log-probs (one sequence per example and option).
- Completion: the mean log-prob of the completion tokens given the prompt (loss = its negation).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.scoring import ScoringSequence, SequenceScores


@dataclass(frozen=True)
class LabelledText:
    text: str
    label: int


@dataclass(frozen=True)
class PromptCompletion:
    prompt: str
    completion: str


@dataclass(frozen=True)
class BatchScore:
    loss: float  # mean over the batch
    num_correct: int  # classification only (0 for completion)
    num_examples: int


def _truncate_left(ids: list[int], max_len: int, keep_first: int) -> list[int]:
    """Drop tokens after the first `keep_first` (BOS) so that len(ids) <= max_len."""
    excess = len(ids) - max_len
    if excess <= 0:
        return ids
    return ids[:keep_first] + ids[keep_first + excess :]


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    return top + math.log(sum(math.exp(v - top) for v in values))


@dataclass(frozen=True)
class ClassificationObjective:
    template: str = "{text} It was"
    options: tuple[str, ...] = (" terrible", " great")

    def encode(self, tokenizer, examples: Sequence[LabelledText], max_len: int) -> "EncodedClassification":
        option_ids = tuple(tuple(tokenizer(o, add_special_tokens=False).input_ids) for o in self.options)
        longest_option = max(len(o) for o in option_ids)
        keep_first = 1 if tokenizer.bos_token_id is not None else 0
        contexts = tuple(
            tuple(_truncate_left(tokenizer(self.template.format(text=ex.text)).input_ids, max_len - longest_option - 1, keep_first))
            for ex in examples
        )
        return EncodedClassification(contexts, tuple(ex.label for ex in examples), option_ids)


@dataclass(frozen=True)
class EncodedClassification:
    contexts: tuple[tuple[int, ...], ...]
    labels: tuple[int, ...]
    option_ids: tuple[tuple[int, ...], ...]

    def __len__(self) -> int:
        return len(self.labels)

    def extended(self, more: "EncodedClassification") -> "EncodedClassification":
        return EncodedClassification(self.contexts + more.contexts, self.labels + more.labels, self.option_ids)

    @property
    def single_token_options(self) -> bool:
        return all(len(o) == 1 for o in self.option_ids)

    def sequences(self, indices: Sequence[int]) -> list[ScoringSequence]:
        if self.single_token_options:
            candidates = tuple(o[0] for o in self.option_ids)
            return [ScoringSequence(self.contexts[i], candidate_ids=candidates) for i in indices]
        return [
            ScoringSequence(self.contexts[i] + option, target_start=len(self.contexts[i]))
            for i in indices
            for option in self.option_ids
        ]

    def class_logits(self, indices: Sequence[int], scores: Sequence[SequenceScores]) -> list[list[float]]:
        if self.single_token_options:
            return [list(s.logprobs) for s in scores]
        num_options = len(self.option_ids)
        return [
            [sum(scores[k * num_options + c].logprobs) / len(self.option_ids[c]) for c in range(num_options)]
            for k in range(len(indices))
        ]

    def score_batch(self, indices: Sequence[int], scores: Sequence[SequenceScores]) -> BatchScore:
        logits = self.class_logits(indices, scores)
        losses = [_logsumexp(row) - row[self.labels[i]] for i, row in zip(indices, logits, strict=True)]
        correct = sum(int(max(range(len(row)), key=row.__getitem__) == self.labels[i]) for i, row in zip(indices, logits))
        return BatchScore(sum(losses) / len(losses), correct, len(losses))


@dataclass(frozen=True)
class CompletionObjective:
    def encode(self, tokenizer, examples: Sequence[PromptCompletion], max_len: int) -> "EncodedCompletion":
        keep_first = 1 if tokenizer.bos_token_id is not None else 0
        pairs = []
        for ex in examples:
            completion = tuple(tokenizer(ex.completion, add_special_tokens=False).input_ids)[: max_len // 2]
            prompt = _truncate_left(tokenizer(ex.prompt).input_ids, max_len - len(completion) - 1, keep_first)
            pairs.append((tuple(prompt), completion))
        return EncodedCompletion(tuple(pairs))


@dataclass(frozen=True)
class EncodedCompletion:
    pairs: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]  # (prompt ids, completion ids)

    def __len__(self) -> int:
        return len(self.pairs)

    def extended(self, more: "EncodedCompletion") -> "EncodedCompletion":
        return EncodedCompletion(self.pairs + more.pairs)

    def sequences(self, indices: Sequence[int]) -> list[ScoringSequence]:
        return [ScoringSequence(self.pairs[i][0] + self.pairs[i][1], target_start=len(self.pairs[i][0])) for i in indices]

    def score_batch(self, indices: Sequence[int], scores: Sequence[SequenceScores]) -> BatchScore:
        losses = [-sum(s.logprobs) / max(1, len(s.logprobs)) for s in scores]
        return BatchScore(sum(losses) / len(losses), 0, len(losses))


EncodedDataset = EncodedClassification | EncodedCompletion
