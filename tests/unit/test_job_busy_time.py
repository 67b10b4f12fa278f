"""A job's busy time: its steps' spans, overlaps counted once (a commit runs while the next step is scored)."""

from __future__ import annotations

import pytest

from scheduler.jobs import StepMetric, busy_s


def _step(end: float, duration: float) -> StepMetric:
    return StepMetric(1, 1, 0.5, 0.1, duration, end, 32, 1000)


def test_back_to_back_steps_sum():
    assert busy_s([_step(1.0, 1.0), _step(2.0, 1.0), _step(3.0, 1.0)]) == pytest.approx(3.0)


def test_a_step_overlapping_the_next_counts_once():
    # Each step is scored for 1 s and committed in 0.2 s while the next one is scored.
    steps = [_step(1.2, 1.2), _step(2.2, 1.2), _step(3.2, 1.2)]
    assert busy_s(steps) == pytest.approx(3.2)
    assert busy_s(reversed(steps)) == pytest.approx(3.2)


def test_time_between_steps_is_not_busy():
    assert busy_s([_step(1.0, 0.5), _step(11.0, 0.5)]) == pytest.approx(1.0)  # paused in between
    assert busy_s([_step(5.0, 4.0), _step(3.0, 1.0)]) == pytest.approx(4.0)  # one span inside another
    assert busy_s([]) == 0.0
