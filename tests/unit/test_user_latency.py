"""The latency signal the co-scheduler reads each round: who is waiting for a first token, the p95 over the
window, and how long since the last arrival."""

from __future__ import annotations

from scheduler.user_latency import UserLatency


def test_the_signal_counts_waiting_and_running_users_and_their_tokens():
    changes = []
    users = UserLatency(window_s=10.0, on_change=lambda: changes.append(1))
    with users.track(20) as first, users.track(30) as second:
        first.first_token()
        first.add_output_tokens(4)
        now = second.started_s + 0.05
        signal = users.signal(now)
        assert (signal.num_user_waiting, signal.num_user_running) == (1, 1)
        assert users.counts() == (1, 1)
        assert signal.num_user_tokens_in_flight == 20 + 4 + 30
        assert abs(signal.max_user_wait_ms - 50.0) < 1e-6
        assert abs(signal.seconds_since_user_arrival_s - 0.05) < 1e-6
        assert signal.ttft_p95_ms is not None  # the first token was recorded
    assert users.counts() == (0, 0)
    assert len(changes) == 5  # two arrivals, one first token, two ends: each wakes the co-scheduler


def test_the_p95_follows_samples_in_the_window_only():
    users = UserLatency(window_s=1.0)
    for i in range(19):
        users.record_ttft(0.010, at_s=100.0 + i * 0.01)
    users.record_ttft(0.500, at_s=100.2)
    assert users.signal(100.5).ttft_p95_ms == 10.0  # one slow sample in twenty is the 5 % the p95 leaves out
    assert users.recent_p95_ms(100.5) == users.signal(100.5).ttft_p95_ms
    assert users.signal(101.19).ttft_p95_ms == 500.0  # the fast samples aged out; the slow one is left
    assert users.signal(102.0).ttft_p95_ms is None
    assert users.recent_p95_ms(102.0) is None
