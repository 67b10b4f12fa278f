"""`gather_or_cancel`: asyncio.gather whose first failure cancels and awaits the siblings.

Plain `gather` lets the other awaitables run on after one raises. Under a step lease that means scoring
requests still in the engine (or chunks still queued at the token gate) after the step gave its probe slots
back: they run against slots another job is rewriting, outside the token budget.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Iterable
from typing import TypeVar

T = TypeVar("T")


async def gather_or_cancel(awaitables: Iterable[Awaitable[T]]) -> list[T]:
    """Results in order; on any failure (or cancellation) no sibling is left running when this raises."""
    tasks = [asyncio.ensure_future(a) for a in awaitables]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
