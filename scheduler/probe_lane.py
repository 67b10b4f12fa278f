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

Pure asyncio: no vLLM, no torch.
"""

from __future__ import annotations

import asyncio
from collections import deque


class ProbeLane:
    def __init__(self) -> None:
        self._waiting: deque[asyncio.Future[None]] = deque()
        self._driver: asyncio.Task | None = None
        self.num_granted = 0

    @property
    def num_waiting(self) -> int:
        return sum(1 for f in self._waiting if not f.done())

    async def turn(self) -> None:
        """Return in a loop turn of this request's own, after every probe that asked before it."""
        future = asyncio.get_running_loop().create_future()
        self._waiting.append(future)
        if self._driver is None or self._driver.done():
            self._driver = asyncio.create_task(self._drive(), name="zoserve-probe-lane")
        await future  # cancelled while waiting: the driver skips it

    async def _drive(self) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if future.done():  # its caller was cancelled
                continue
            future.set_result(None)
            self.num_granted += 1
            # The granted caller runs in the next turn, ahead of this driver: one submission per turn.
            await asyncio.sleep(0)
