"""A job's step size in tokens (the planner's unit) is estimated once per dataset, not at every step."""

from __future__ import annotations

from scheduler.job_runner import StepTokens, step_tokens
from scheduler.objectives import EncodedClassification


class CountingData(EncodedClassification):
    """An encoded classification set that counts how often its sequences are built."""

    builds = 0

    def sequences(self, indices):
        type(self).builds += 1
        return super().sequences(indices)


def _data(n: int, length: int) -> CountingData:
    return CountingData(tuple((2,) + (5,) * length for _ in range(n)), tuple(i % 2 for i in range(n)), ((7,), (9,)))


def test_the_estimate_is_reused_until_the_data_or_the_step_shape_changes():
    estimate = StepTokens()
    data = _data(40, 10)
    first = estimate(data, 16, 2)
    assert first == step_tokens(data, 16, 2)
    builds = CountingData.builds
    assert [estimate(data, 16, 2) for _ in range(5)] == [first] * 5
    assert CountingData.builds == builds, "same data, same shape: no new sample"
    assert estimate(data, 8, 2) == step_tokens(data, 8, 2) and CountingData.builds > builds
    longer = CountingData(*(getattr(data.extended(_data(40, 30)), f) for f in ("contexts", "labels", "option_ids")))
    assert estimate(longer, 8, 2) == step_tokens(longer, 8, 2) > step_tokens(data, 8, 2), "a new dataset is measured"
