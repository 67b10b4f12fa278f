"""What the engine is asked to score, and what it returns: plain records shared by engine and baseline."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ScoringSequence:
    """One sequence to score.

    With `candidate_ids` set (the cheap path; every classification sequence): the log-probs of those token ids at
    the position right after `token_ids`. Otherwise: the log-probs of `token_ids[target_start:]`, each given
    its prefix (prompt log-probs over the whole vocabulary at every position; the completion objective).
    """

    token_ids: tuple[int, ...]
    candidate_ids: tuple[int, ...] = ()
    target_start: int = 0

    @property
    def num_scores(self) -> int:
        return len(self.candidate_ids) if self.candidate_ids else len(self.token_ids) - self.target_start


@dataclass(frozen=True)
class SequenceScores:
    logprobs: tuple[float, ...]  # one per candidate id, or one per target token
