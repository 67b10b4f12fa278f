"""A phase's measurement windows on the wall clock.

With `--rounds 1` each phase is one window, as the issue's three phases run one after the other. With
`--rounds N` the three phases take turns in N rounds of 1/N of the phase length each (users, zo, together;
users, zo, together; ...), and a phase is the union of its N windows: the machine's speed drifts by ±20 % over
minutes here, and phases measured minutes apart compared that drift as much as the system. Every per-phase
figure (latency percentiles, steps per second, engine-step shares, CPU) is taken over the union.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass(frozen=True)
class Windows:
    spans: tuple[tuple[float, float], ...]  # [start, end) on the wall clock, in order, not overlapping

    def __post_init__(self) -> None:
        for start, end in self.spans:
            if not end >= start:
                raise ValueError(f"window ends before it starts: [{start}, {end})")
        for (_, end), (start, _) in zip(self.spans, self.spans[1:]):
            if start < end:
                raise ValueError(f"windows overlap or are out of order: {self.spans}")

    @classmethod
    def of(cls, start: float, end: float) -> Windows:
        return cls(((start, end),))

    def add(self, start: float, end: float) -> Windows:
        return Windows((*self.spans, (start, end)))

    def __contains__(self, t: float) -> bool:
        return any(start <= t < end for start, end in self.spans)

    def __iter__(self) -> Iterator[tuple[float, float]]:
        return iter(self.spans)

    @property
    def duration_s(self) -> float:
        return sum(end - start for start, end in self.spans)

    @property
    def start(self) -> float:
        return self.spans[0][0]

    @property
    def end(self) -> float:
        return self.spans[-1][1]

    def window_end(self, t: float) -> float | None:
        """The end of the window holding `t` (None: outside every window)."""
        return next((end for start, end in self.spans if start <= t < end), None)

    def to_json(self) -> list[list[float]]:
        return [[start, end] for start, end in self.spans]


USER_PHASES = ("users", "together", "together_b")  # the phases that carry user load (together_b: an A/B)


def together_windows(setting, ab_setting, round_index: int) -> list[tuple[str, object]]:
    """A round's together windows and the setting each runs at (None: the service's as it is). With an A/B
    setting (`--ab-gate-tokens`: a per-step probe cap; `--ab-fast-paths`: the engine's per-step paths on or
    off), `together` (at `setting`) and `together_b` (at `ab_setting`) on the same arrivals, their order
    alternating by round so that neither always runs later in the round."""
    if ab_setting is None:
        return [("together", None)]
    pair = [("together", setting), ("together_b", ab_setting)]
    return pair if round_index % 2 == 0 else pair[::-1]


def merge_counts(views: Iterable[dict]) -> dict:
    """One view from several windows' views of the same counters: sums, except maxima (`*_max_ms`) stay maxima."""
    merged: dict = {}
    for view in views:
        for key, value in (view or {}).items():
            if key not in merged:
                merged[key] = value
            elif key.endswith("_max_ms"):
                merged[key] = max(merged[key], value)
            else:
                merged[key] += value
    return merged
