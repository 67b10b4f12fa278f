"""The benchmark's join of load-generator samples and service TTFT stages (bench/coserve_parts/ttft_path.py)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from coserve_parts.load import UserSample  # noqa: E402
from coserve_parts.monitors import StageRecord  # noqa: E402
from coserve_parts.ttft_path import join_paths, summarise_paths  # noqa: E402
from coserve_parts.windows import Windows  # noqa: E402

from service.metrics import TTFT_STAGES as STAGES  # noqa: E402

ONE_MS = (0.001,) * len(STAGES)


def _request(i: int, scheduled: float, *, http_in: float, stages: tuple[float, ...], http_out: float, lag=0.001):
    """A sample and the service's record for it, built forwards along the request's path (seconds)."""
    sent = scheduled + lag
    entered = sent + http_in
    seen = entered + sum(stages)
    first_text = seen + http_out
    sample = UserSample("users", scheduled, sent, first_text, first_text + 0.05, 20, 16, None, f"cmpl-{i}")
    return sample, StageRecord(seen, dict(zip(STAGES, stages)), f"cmpl-{i}")


def test_the_parts_add_up_to_the_client_ttft_and_keep_their_order():
    sample, record = _request(1, 100.0, http_in=0.002, stages=(0.0005, 0.001, 0.004, 0.0, 0.003, 0.002), http_out=0.006)
    [row] = join_paths([sample], [record], Windows.of(99.0, 101.0))
    assert list(row) == ["send_lag", "http_in", *STAGES, "http_out"]
    assert sum(row.values()) == pytest.approx(1000.0 * sample.ttft_s)
    assert row["http_in"] == pytest.approx(2.0)
    assert row["to_engine"] == pytest.approx(4.0)
    assert row["http_out"] == pytest.approx(6.0)


def test_samples_outside_the_window_without_text_or_without_stages_are_left_out():
    inside, inside_record = _request(1, 100.0, http_in=0.001, stages=ONE_MS, http_out=0.001)
    outside, outside_record = _request(2, 200.0, http_in=0.001, stages=ONE_MS, http_out=0.001)
    unrecorded, _ = _request(3, 100.5, http_in=0.001, stages=ONE_MS, http_out=0.001)
    failed = UserSample("users", 100.2, 100.2, None, 100.3, 20, 0, "HTTP 500", None)
    anonymous = StageRecord(100.4, dict(zip(STAGES, ONE_MS)), None)
    rows = join_paths([inside, outside, unrecorded, failed], [inside_record, outside_record, anonymous], Windows.of(99.0, 101.0))
    assert len(rows) == 1
    assert sum(rows[0].values()) == pytest.approx(1000.0 * inside.ttft_s)
    # Measured in rounds, a phase is several windows: the second one brings the other sample in.
    both = join_paths([inside, outside], [inside_record, outside_record], Windows.of(99.0, 101.0).add(199.0, 201.0))
    assert len(both) == 2


def test_the_summary_names_where_the_slowest_requests_lost_their_time():
    pairs = [_request(i, 100.0 + i * 0.01, http_in=0.001, stages=ONE_MS, http_out=0.002) for i in range(199)]
    # One request in the slowest 1 % (2 of 200 rows) lost 40 ms on the way back to the client.
    pairs.append(_request(199, 102.0, http_in=0.001, stages=ONE_MS, http_out=0.042))
    samples, records = zip(*pairs)
    summary = summarise_paths(join_paths(samples, records, Windows.of(99.0, 103.0)), len(samples))
    assert summary["num_joined"] == summary["num_samples"] == 200
    assert summary["middle_tenth_mean_ms"]["http_out"] == pytest.approx(2.0)
    assert summary["slowest_1pct_mean_ms"]["http_out"] == pytest.approx((42.0 + 2.0) / 2)
    assert summary["slowest_1pct_mean_ms"]["to_engine"] == pytest.approx(1.0)
    assert summarise_paths([], 0) == {}
