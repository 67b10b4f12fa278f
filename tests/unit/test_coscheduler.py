"""The co-scheduler loop: grants hand out free slots, waiting users shrink the ZO budget, fairness by weight."""

from __future__ import annotations

import asyncio

from scheduler.adapter_host import SlotPool
from scheduler.coscheduler import CoScheduler, CoSchedulerConfig


def _make(target_ttft_ms: float = 100.0, max_tokens: int = 4000) -> tuple[CoScheduler, SlotPool]:
    pool = SlotPool((1, 2, 3, 4, 5, 6))
    co = CoScheduler(CoSchedulerConfig(target_ttft_ms=target_ttft_ms, max_tokens_in_flight=max_tokens), pool, (1, 2, 3, 4, 5, 6), list)
    return co, pool


async def test_grant_takes_free_slots_and_returns_them():
    co, pool = _make()
    co.start()
    try:
        async with asyncio.timeout(10), co.step("job-a", 1.0, 100, 2) as slots:
            assert len(slots) == 2 and len(set(slots)) == 2
            assert pool.num_free == 4 and not set(slots) & set(pool.free_slots())
            assert co.snapshot().num_steps_in_flight == 1
        assert pool.num_free == 6
    finally:
        await co.stop()


async def test_slow_first_tokens_shrink_the_budget():
    """(A step larger than the shrunk budget would wait until latency recovers: user latency comes first.)"""
    co, _ = _make(target_ttft_ms=50.0)
    co.start()
    try:
        for _ in range(20):  # no users: the budget grows
            async with co.step("job-a", 1.0, 500, 2):
                await asyncio.sleep(0)
        grown = co.latest_record.budget_tokens
        async with co.user_request(10) as user, asyncio.timeout(10):  # a user is served while ZO asks for steps
            user.first_token()
            for _ in range(3):
                co._record_ttft(0.2)  # recent users' first tokens took 200 ms: 4x the target
                async with co.step("job-a", 1.0, 100, 2):
                    await asyncio.sleep(0)
        assert co.latest_record.budget_tokens <= grown // 4
        assert co.latest_record.measured_ttft_ms >= 150
    finally:
        await co.stop()


async def test_weighted_jobs_share_steps():
    co, _ = _make(max_tokens=120)  # one 100-token step in flight at a time: the jobs contend
    co.start()
    counts = {"light": 0, "heavy": 0}

    async def worker(job: str, weight: float) -> None:
        while sum(counts.values()) < 60:
            async with co.step(job, weight, 100, 2):
                counts[job] += 1
                await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(asyncio.gather(worker("light", 1.0), worker("heavy", 2.0)), 30)
    finally:
        await co.stop()
    share = counts["heavy"] / sum(counts.values())
    assert 0.55 <= share <= 0.8, counts


async def test_slots_taken_but_not_yet_serving_are_never_granted():
    co, pool = _make()
    held = pool.take(2)  # an adapter load between taking its buffers and registering them
    co.start()
    try:
        async with asyncio.timeout(10), co.step("job-a", 1.0, 100, 2) as slots:
            assert not set(slots) & set(held)
    finally:
        await co.stop()
