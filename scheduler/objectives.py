"""Scoring objectives: how examples become scoring sequences and how scores become a loss.

Pure code over token ids (the tokenizer is passed in): the engine path and the baseline loop build the same
sequences from the same examples and reduce the same scores, so they differ only in the forward pass.

- Classification (MeZO/LoZO on SST-2): prompt template + one verbalizer per class; per example the logit of
  class c is the mean log-prob of its option tokens, and the loss is cross-entropy over the classes.
  Every sequence is scored the cheap way, by the log-probs of a few candidate tokens at its last position
  (never full-vocabulary prompt log-probs): the options form a trie, and each example sends one sequence per
  trie node, its context + the node's prefix, with the tokens that follow that prefix as candidates. Single-
  token options are one node: one sequence per example. " terrible" / " great" with " terrible" split in two
  are two: (context; " terr", " great") and (context + " terr"; "ible").
- Completion: the mean log-prob of the completion tokens given the prompt (loss = its negation).
"""

from __future__ import annotations

import functools
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
class OptionTrie:
    """The options' token prefixes as scoring nodes.

    nodes: (prefix, candidate next tokens) per node, root first; candidates in the options' order.
    paths: per option, its (node index, candidate index) per token: the option's log-prob is the sum of those
        candidates' log-probs.
    """

    nodes: tuple[tuple[tuple[int, ...], tuple[int, ...]], ...]
    paths: tuple[tuple[tuple[int, int], ...], ...]


@functools.lru_cache(maxsize=64)
def option_trie(option_ids: tuple[tuple[int, ...], ...]) -> OptionTrie:
    node_of: dict[tuple[int, ...], int] = {}
    candidates: list[list[int]] = []
    prefixes: list[tuple[int, ...]] = []
    paths = []
    for option in option_ids:
        path = []
        for k, token in enumerate(option):
            prefix = option[:k]
            if prefix not in node_of:
                node_of[prefix] = len(prefixes)
                prefixes.append(prefix)
                candidates.append([])
            node = candidates[node_of[prefix]]
            if token not in node:
                node.append(token)
            path.append((node_of[prefix], node.index(token)))
        paths.append(tuple(path))
    return OptionTrie(tuple(zip(prefixes, (tuple(c) for c in candidates))), tuple(paths))


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
        """Per example (in `indices` order), one sequence per node of the option trie."""
        nodes = option_trie(self.option_ids).nodes
        return [
            ScoringSequence(self.contexts[i] + prefix, candidate_ids=candidates)
            for i in indices
            for prefix, candidates in nodes
        ]

    def class_logits(self, indices: Sequence[int], scores: Sequence[SequenceScores]) -> list[list[float]]:
        """Per example, each option's mean token log-prob."""
        trie = option_trie(self.option_ids)
        num_nodes = len(trie.nodes)
        return [
            [
                sum(scores[k * num_nodes + node].logprobs[c] for node, c in path) / len(path)
                for path in trie.paths
            ]
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
