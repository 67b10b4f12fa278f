"""The probe lane: probe requests enter the engine one per event-loop turn, so user work on the loop never
waits behind a burst of them.

Everything on the server side shares one asyncio loop: HTTP parsing, tokenising, streaming users' tokens,
the step loops, and handing every request to vLLM (`AsyncLLM.add_request`: input processing, msgpack, a zmq
send that wakes the engine core). asyncio runs every callback that is ready at the start of a turn before it
polls its sockets again. When the co-scheduler admits a few chunks at once, their ~100 probe requests become
ready together and each turn carries all their submissions; a user's HTTP request or first token, arriving on a
socket meanwhile, waits until the whole burst is through. Measured (`bench/coserve.py`, deep probe queue):
~300 event-loop lags over 5 ms in a 40 s together phase, 3 s in all, up to 42 ms, and user TTFT p99 doubled.

A probe asks for its turn (`await lane.turn()`) right before it submits. One driver task grants turns in FIFO
order, one per loop turn, and yields between grants, so each loop turn carries at most one probe submission
next to whatever user callbacks its socket poll made ready. Probe requests wait at most a few loop turns each
when the loop is otherwise idle (a turn then costs microseconds), and the engine-side order is unchanged.

A user request also holds the lane from its arrival to its first token (`hold()`): its own path through the
loop spans many turns (routing, tokenising, its submission, output processing, the first SSE write), and a
probe submission in each of them adds up. While held, the lane still grants a turn every `max_hold_gap_s`,
so back-to-back arrivals never starve ZO; the engine meanwhile works through the probes already queued.

Pure asyncio: no vLLM, no torch.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque


class LaneHold:
    """One user request between its arrival and its first token; `release()` is idempotent."""

    def __init__(self, lane: ProbeLane) -> None:
        self._lane = lane
        self._held = True

    def release(self) -> None:
        if self._held:
            self._held = False
            self._lane._release()


class ProbeLane:
    def __init__(self, max_hold_gap_s: float = 0.010) -> None:
        """`max_hold_gap_s`: while users hold the lane, it still grants one turn at least this often, so a
        steady stream of arrivals never starves ZO (the engine's queue of admitted probes stays fed)."""
        if not max_hold_gap_s >= 0:
            raise ValueError(f"max_hold_gap_s must be >= 0, got {max_hold_gap_s!r}")
        self.max_hold_gap_s = max_hold_gap_s
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._driver: asyncio.Task | None = None
        self._num_holds = 0
        self._released = asyncio.Event()  # set when the last hold goes
        self._last_grant_s = -math.inf
        self.num_granted = 0
        self.num_granted_while_held = 0

    @property
    def num_waiting(self) -> int:
        return sum(1 for f in self._waiting if not f.done())

    @property
    def num_holds(self) -> int:
        return self._num_holds

    def hold(self) -> LaneHold:
        """A user request arrived: probe submissions pause (up to `max_hold_gap_s` between turns) until every
        hold is released, so the request's own trip through the loop (routing, tokenising, its submission,
        its first token) meets no probe work in between."""
        self._num_holds += 1
        return LaneHold(self)

    def _release(self) -> None:
        self._num_holds -= 1
        if self._num_holds == 0:
            self._released.set()

    async def turn(self) -> None:
        """Return in a loop turn of this request's own, after every probe that asked before it."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(), name="zoserve-probe-lane")
        await future  # cancelled while waiting: the driver skips it

    async def _drive(self) -> None:
        loop = asyncio.get_running_loop()
        while self._waiting:
            if self._num_holds > 0:
                remaining = self._last_grant_s + self.max_hold_gap_s - loop.time()
                if remaining > 0:
                    self._released.clear()
                    try:
                        await asyncio.wait_for(self._released.wait(), remaining)
                    except TimeoutError:
                        pass
                    continue
            future = self._waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            future.set_result(None)
            self.num_granted += 1
            if self._num_holds > 0:
                self.num_granted_while_held += 1
            self._last_grant_s = loop.time()
            # The granted caller runs in the next turn, ahead of this driver: one submission per turn.
            await asyncio.sleep(0)
