"""A non-differentiable reward objective: greedy-generate an answer, score it by a match rule.

The loss ZO minimises is what users measure: 1 − the fraction of examples whose greedy generation matches
one of its reference answers. Pure code (no torch, no vllm): `RewardObjective.encode` turns examples into
prompt token ids, `reward` is the match rule, `EncodedReward.reward_batch` reduces generations to a
`BatchScore`. Generating under a probe slot is the engine's part (`scheduler.probe_eval`).

Match rules compare word sequences (lower-cased runs of letters/digits, so case, punctuation and spacing do
not count):
- `exact`: the generation's words equal a reference's words.
- `contains`: a reference's words occur as a contiguous run in the generation's words ("contains the label
  word", as a word, not as a substring: "great" is not in "greatly").
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.objectives import BatchScore, PromptCompletion, _truncate_left
from scheduler.scoring import ScoringSequence

MATCH_RULES = ("exact", "contains")
MAX_NEW_TOKENS = 256
_WORD = re.compile(r"\w+")


def words(text: str) -> tuple[str, ...]:
    return tuple(_WORD.findall(text.lower()))


def _contains(haystack: tuple[str, ...], needle: tuple[str, ...]) -> bool:
    n = len(needle)
    return any(haystack[i : i + n] == needle for i in range(len(haystack) - n + 1))


class InvalidRewardObjective(ValueError):
    """A bad objective field; `field` names it (the message starts with it too)."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def reward(generation: str, references: Sequence[str], match: str) -> float:
    """1.0 when `generation` matches any reference under rule `match`, else 0.0."""
    if match not in MATCH_RULES:
        raise ValueError(f"match: {match!r} is not one of {list(MATCH_RULES)}")
    generated = words(generation)
    for reference in references:
        wanted = words(reference)
        if not wanted:
            continue
        if (generated == wanted) if match == "exact" else _contains(generated, wanted):
            return 1.0
    return 0.0


def reward_loss(rewards: Sequence[float]) -> float:
    """The per-probe loss: 1 − mean reward over the minibatch."""
    if not rewards:
        raise ValueError("rewards: empty minibatch")
    return 1.0 - sum(rewards) / len(rewards)


@dataclass(frozen=True)
class RewardObjective:
    """Rows are (prompt, reference answer); the prompt goes through `template` ({prompt} marks it)."""

    template: str = "{prompt}"
    match: str = "contains"
    max_new_tokens: int = 8
    stop: tuple[str, ...] = ()  # stop strings, e.g. ("\n",): the generation ends before them

    def __post_init__(self) -> None:
        if "{prompt}" not in self.template:
            raise InvalidRewardObjective("template", "must contain {prompt}")
        try:
            self.template.format(prompt="")
        except (KeyError, IndexError, ValueError) as exc:
            raise InvalidRewardObjective("template", f"only {{prompt}} may be a placeholder ({exc!r})") from None
        if self.match not in MATCH_RULES:
            raise InvalidRewardObjective("match", f"{self.match!r} is not one of {list(MATCH_RULES)}")
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) or not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise InvalidRewardObjective("max_new_tokens", f"{self.max_new_tokens!r} must be an integer in [1, {MAX_NEW_TOKENS}]")
        if any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRewardObjective("stop", "every stop string must be a non-empty string")

    def encode(self, tokenizer, examples: Sequence[PromptCompletion], max_len: int) -> "EncodedReward":
        keep_first = 1 if tokenizer.bos_token_id is not None else 0
        budget = max_len - self.max_new_tokens - 1
        if budget < 1 + keep_first:
            raise InvalidRewardObjective("max_new_tokens", f"{self.max_new_tokens} leaves no room for a prompt in {max_len} tokens")
        prompts, references = [], []
        for index, ex in enumerate(examples):
            if not words(ex.completion):
                raise InvalidRewardObjective(f"examples[{index}].completion", "the reference answer has no word to match")
            ids = tokenizer(self.template.format(prompt=ex.prompt)).input_ids
            prompts.append(tuple(_truncate_left(list(ids), budget, keep_first)))
            references.append((ex.completion,))
        return EncodedReward(tuple(prompts), tuple(references), self.match, self.max_new_tokens, self.stop)


@dataclass(frozen=True)
class EncodedReward:
    prompts: tuple[tuple[int, ...], ...]  # prompt token ids per example
    references: tuple[tuple[str, ...], ...]  # accepted answers per example
    match: str
    max_new_tokens: int
    stop: tuple[str, ...] = ()

    def __len__(self) -> int:
        return len(self.prompts)

    def extended(self, more: "EncodedReward") -> "EncodedReward":
        return EncodedReward(
            self.prompts + more.prompts, self.references + more.references, self.match, self.max_new_tokens, self.stop
        )

    def sequences(self, indices: Sequence[int]) -> list[ScoringSequence]:
        """The prompts a step submits (token accounting; the engine generates from them, it scores nothing)."""
        return [ScoringSequence(self.prompts[i]) for i in indices]

    def reward_batch(self, indices: Sequence[int], generations: Sequence[str]) -> BatchScore:
        rewards = [
            reward(text, self.references[i], self.match) for i, text in zip(indices, generations, strict=True)
        ]
        return BatchScore(reward_loss(rewards), int(sum(rewards)), len(rewards))
