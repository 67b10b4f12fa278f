"""A job's step metrics are served a page at a time: in step order, after a step number, with their evaluations."""

from __future__ import annotations

from collections import deque

from scheduler.jobs import EvalMetric, StepMetric, metrics_page


def _steps(numbers) -> deque[StepMetric]:
    return deque((StepMetric(n, n, 1.0 / n, 0.1, 0.05, 1e9 + n, 32, 1300) for n in numbers), maxlen=100_000)


def _evals(numbers) -> list[EvalMetric]:
    return [EvalMetric(n, n, 0.5, 0.75, 1e9 + n) for n in numbers]


def test_pages_cover_every_step_once_in_order():
    steps, evals = _steps(range(1, 2501)), _evals(range(100, 2501, 100))
    seen_steps, seen_evals, after, pages = [], [], 0, 0
    while True:
        page = metrics_page(steps, evals, after, 1000)
        pages += 1
        seen_steps += [m.step for m in page.steps]
        seen_evals += [e.step for e in page.evals]
        if not page.has_more:
            break
        after = page.steps[-1].step
    assert pages == 3
    assert seen_steps == list(range(1, 2501))
    assert seen_evals == list(range(100, 2501, 100))


def test_a_page_starts_after_the_step_asked_for_even_with_gaps_and_dropped_history():
    steps = _steps([5, 6, 9, 12, 13])  # the oldest dropped, numbers jumping after a head conflict
    page = metrics_page(steps, _evals([6, 12]), 6, 2)
    assert [m.step for m in page.steps] == [9, 12] and page.has_more
    assert [e.step for e in page.evals] == [12]
    last = metrics_page(steps, _evals([6, 12]), 12, 2)
    assert [m.step for m in last.steps] == [13] and not last.has_more and last.evals == []
    assert metrics_page(steps, [], 99, 10) == metrics_page(deque(), [], 0, 10)  # nothing after the end
