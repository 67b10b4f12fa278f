"""The user side of co-scheduling: live user requests and their recent times to first token, read by every
co-scheduler round as one `LatencySignal`.

A round runs at every event (hundreds a second with users and jobs), so the window's p95 is kept until a
sample arrives or ages out, not recomputed each round.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

from scheduler.planning import LatencySignal, percentile_ms


@dataclass
class UserRequestHandle:
    """One user request from its arrival: call `first_token()` once it has one."""

    num_prompt_tokens: int
    started_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    num_output_tokens: int = 0
    _users: UserLatency | None = None

    def first_token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.monotonic()
            if self._users is not None:
                self._users.record_ttft(self.first_token_s - self.started_s)

    def add_output_tokens(self, count: int) -> None:
        self.num_output_tokens += count

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.started_s


class UserLatency:
    """Requests in flight and (time, TTFT ms) samples of the last `window_s`; `on_change` is called when
    either changes (the co-scheduler then plans a round)."""

    def __init__(self, window_s: float, on_change: Callable[[], None] = lambda: None, max_samples: int = 4096):
        self.window_s = window_s
        self._on_change = on_change
        self._handles: dict[int, UserRequestHandle] = {}
        self._last_arrival_s: float | None = None
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=max_samples)  # (time, ms)
        self._num_changes = 0  # samples added or aged out so far
        self._p95: tuple[int, float | None] = (-1, None)  # (_num_changes when computed, p95 ms)

    @contextmanager
    def track(self, num_prompt_tokens: int) -> Iterator[UserRequestHandle]:
        """A request from arrival to its end."""
        handle = UserRequestHandle(num_prompt_tokens)
        self.add(handle)  # which ties the handle to this tracker
        try:
            yield handle
        finally:
            self.remove(handle)

    def add(self, handle: UserRequestHandle) -> None:
        handle._users = self
        self._handles[id(handle)] = handle
        self._last_arrival_s = handle.started_s
        self._on_change()

    def remove(self, handle: UserRequestHandle) -> None:
        self._handles.pop(id(handle), None)
        self._on_change()

    def record_ttft(self, seconds: float, at_s: float | None = None) -> None:
        self._ttfts.append((time.monotonic() if at_s is None else at_s, seconds * 1000.0))
        self._num_changes += 1
        self._on_change()

    def counts(self) -> tuple[int, int]:
        """(requests waiting for a first token, requests past it)."""
        waiting = sum(1 for h in self._handles.values() if h.first_token_s is None)
        return waiting, len(self._handles) - waiting

    def recent_p95_ms(self, now: float) -> float | None:
        """p95 TTFT over the window ending at `now`; samples older than the window are dropped."""
        while self._ttfts and self._ttfts[0][0] < now - self.window_s:
            self._ttfts.popleft()
            self._num_changes += 1
        if self._p95[0] != self._num_changes:
            p95 = percentile_ms([ms for _, ms in self._ttfts], 0.95) if self._ttfts else None
            self._p95 = (self._num_changes, p95)
        return self._p95[1]

    def signal(self, now: float) -> LatencySignal:
        handles = list(self._handles.values())
        waiting = [h for h in handles if h.first_token_s is None]
        return LatencySignal(
            ttft_p95_ms=self.recent_p95_ms(now),
            num_user_running=len(handles) - len(waiting),
            num_user_waiting=len(waiting),
            num_user_tokens_in_flight=sum(h.num_prompt_tokens + h.num_output_tokens for h in handles),
            seconds_since_user_arrival_s=None if self._last_arrival_s is None else max(0.0, now - self._last_arrival_s),
            max_user_wait_ms=max(((now - h.started_s) * 1000.0 for h in waiting), default=0.0),
        )
