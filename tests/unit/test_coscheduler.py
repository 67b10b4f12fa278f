"""The co-scheduler loop: grants hand out free slots, chunks enter under the budget, fairness by weight."""

from __future__ import annotations

import asyncio

import pytest

from scheduler.adapter_host import SlotPool
from scheduler.coscheduler import CoScheduler, CoSchedulerConfig


def _make(
    target_ttft_ms: float = 100.0, max_tokens: int = 4000, chunk_tokens: int = 100, ttft_window_s: float = 5.0
) -> tuple[CoScheduler, SlotPool]:
    pool = SlotPool((1, 2, 3, 4, 5, 6))
    config = CoSchedulerConfig(
        target_ttft_ms=target_ttft_ms, max_tokens_in_flight=max_tokens, chunk_tokens=chunk_tokens,
        ttft_window_s=ttft_window_s,
    )
    co = CoScheduler(config, pool, (1, 2, 3, 4, 5, 6), list)
    return co, pool


async def test_grant_takes_free_slots_and_returns_them():
    co, pool = _make()
    co.start()
    try:
        async with asyncio.timeout(10), co.step("job-a", 1.0, 100, 2) as lease:
            slots = lease.slot_ids
            assert len(slots) == 2 and len(set(slots)) == 2
            assert pool.num_free == 4 and not set(slots) & set(pool.free_slots())
            assert co.snapshot().num_steps_in_flight == 1
        assert pool.num_free == 6
    finally:
        await co.stop()


async def test_chunks_enter_under_the_budget_and_leave_on_exit():
    co, _ = _make(max_tokens=300, chunk_tokens=100)
    co.start()
    try:
        async with asyncio.timeout(10), co.step("job-a", 1.0, 1000, 2) as lease:
            inside = asyncio.Event()
            release = asyncio.Event()
            peak = 0

            async def chunk():
                nonlocal peak
                async with lease.gate.admit(100):
                    peak = max(peak, co.snapshot().num_probe_tokens_in_flight)
                    inside.set()
                    await release.wait()

            tasks = [asyncio.create_task(chunk()) for _ in range(10)]
            await inside.wait()
            await asyncio.sleep(0.05)
            snap = co.snapshot()
            assert snap.num_probe_tokens_in_flight <= co.latest_record.budget_tokens
            assert snap.num_chunks_waiting == 10 - snap.num_probe_tokens_in_flight // 100 > 0
            release.set()
            await asyncio.gather(*tasks)
            assert peak <= 300
            assert co.snapshot().num_probe_tokens_in_flight == 0
    finally:
        await co.stop()


async def test_slow_first_tokens_shrink_the_budget():
    co, _ = _make(target_ttft_ms=50.0, max_tokens=4000)
    co.start()
    try:
        for _ in range(20):  # no users: the budget grows
            async with co.step("job-a", 1.0, 500, 2) as lease, lease.gate.admit(100):
                await asyncio.sleep(0.06)  # longer than the controller's increase interval
        grown = co.latest_record.budget_tokens
        assert grown > 1000
        async with co.user_request(10) as user, asyncio.timeout(10):  # a user is served while ZO runs
            user.first_token()
            for _ in range(4):
                co.users.record_ttft(0.2)  # recent users' first tokens took 200 ms: 4x the target
                async with co.step("job-a", 1.0, 100, 2) as lease, lease.gate.admit(100):
                    await asyncio.sleep(0.3)
        assert co.latest_record.budget_tokens <= grown // 4
        assert co.latest_record.measured_ttft_ms >= 150
    finally:
        await co.stop()


async def test_weighted_jobs_share_steps_even_when_the_budget_has_room():
    co, _ = _make(max_tokens=100_000)  # budget never binds: only fairness can hold the light job back
    co.start()
    counts = {"light": 0, "heavy": 0}

    async def worker(job: str, weight: float) -> None:
        while sum(counts.values()) < 90:
            async with co.step(job, weight, 100, 2) as lease, lease.gate.admit(100):
                counts[job] += 1
                await asyncio.sleep(0.005)

    try:
        await asyncio.wait_for(asyncio.gather(worker("light", 1.0), worker("heavy", 2.0)), 30)
    finally:
        await co.stop()
    share = counts["heavy"] / sum(counts.values())
    assert abs(share - 2 / 3) <= 0.05, counts


async def test_slots_taken_but_not_yet_serving_are_never_granted():
    co, pool = _make()
    held = pool.take(2)  # an adapter load between taking its buffers and registering them
    co.start()
    try:
        async with asyncio.timeout(10), co.step("job-a", 1.0, 100, 2) as lease:
            assert not set(lease.slot_ids) & set(held)
    finally:
        await co.stop()


async def test_a_step_cancelled_right_after_its_grant_gives_its_slots_back():
    co, pool = _make()  # loop not started: plan_once grants in this tick, the cancel lands before the wake-up

    async def step() -> None:
        async with co.step("job-a", 1.0, 100, 2):
            raise AssertionError("a cancelled step must not run")

    task = asyncio.create_task(step())
    await asyncio.sleep(0)  # the step now waits for its grant
    co.plan_once()
    assert pool.num_free == 4  # granted: its slots are taken
    charged = co._state.fairness.by_job()["job-a"].num_tokens_granted_total
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert task.cancelled()
    assert pool.num_free == 6
    assert co._state.fairness.by_job()["job-a"].num_tokens_granted_total == charged - 100
    assert co.snapshot().num_steps_waiting == 0 and co.snapshot().num_steps_in_flight == 0


async def test_a_chunk_cancelled_right_after_its_admission_leaves_no_tokens_in_flight():
    co, pool = _make()
    co.start()
    try:
        async with asyncio.timeout(10), co.step("job-a", 1.0, 100, 2) as lease:
            await co.stop()  # plan by hand from here on

            async def chunk() -> None:
                async with lease.gate.admit(100):
                    raise AssertionError("a cancelled chunk must not run")

            task = asyncio.create_task(chunk())
            await asyncio.sleep(0)
            co.plan_once()
            assert co.snapshot().num_probe_tokens_in_flight == 100
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            assert task.cancelled()
            snap = co.snapshot()
            assert snap.num_probe_tokens_in_flight == 0 and snap.num_chunks_waiting == 0
        assert pool.num_free == 6
    finally:
        await co.stop()


def test_budget_floor_is_a_number_of_chunks():
    assert CoSchedulerConfig(chunk_tokens=128).controller().min_tokens_in_flight == 256  # default: two chunks
    off = CoSchedulerConfig(chunk_tokens=128, min_chunks_in_flight=0).controller()
    assert off.min_tokens_in_flight == 0  # ZO may stop entirely while users' latency is over target
    assert CoSchedulerConfig(chunk_tokens=4096, max_tokens_in_flight=1000).controller().min_tokens_in_flight == 1000


async def test_a_job_short_of_slots_held_by_busy_served_adapters_does_not_stall_the_others():
    slots = (1, 2, 3, 4, 5, 6)
    pool = SlotPool(slots)
    served = {slot: f"user-adapter@{slot}" for slot in pool.take(4)}
    users_in_flight = [1]  # the served adapters are busy at first, so nothing can be reclaimed yet

    async def reclaim() -> bool:
        if not served or users_in_flight[0]:
            return False
        slot, _ = served.popitem()
        await pool.give_back((slot,))
        return True

    config = CoSchedulerConfig(target_ttft_ms=100.0, max_tokens_in_flight=4000, chunk_tokens=100)
    co = CoScheduler(config, pool, slots, lambda: [(s, o, users_in_flight[0]) for s, o in served.items()], reclaim)
    done = {"big": 0, "small": 0}

    async def worker(job: str, num_slots: int) -> None:
        while done[job] < 3:
            async with co.step(job, 1.0, 100, num_slots) as lease, lease.gate.admit(100):
                done[job] += 1
                await asyncio.sleep(0.01)

    co.start()
    try:
        small = asyncio.create_task(worker("small", 2))
        big = asyncio.create_task(worker("big", 4))  # needs more slots than the busy adapters leave
        await asyncio.wait_for(small, 10)  # it must not wait behind the job that cannot run
        assert done == {"big": 0, "small": 3}
        users_in_flight[0] = 0
        co.wake()
        await asyncio.wait_for(big, 10)
        assert done["big"] == 3 and pool.num_free == 6 - len(served)
    finally:
        await co.stop()


async def test_the_measured_ttft_follows_new_samples_and_forgets_old_ones():
    """Rounds reuse the window's p95 while no sample came or left: it must still move when one does."""
    co, _ = _make(target_ttft_ms=50.0, ttft_window_s=0.3)
    co.plan_once()
    assert co.latest_record.measured_ttft_ms is None
    for _ in range(5):
        co.users.record_ttft(0.02)
    co.plan_once()
    assert co.latest_record.measured_ttft_ms == pytest.approx(20.0)
    co.users.record_ttft(0.4)  # one slow first token: the p95 of six samples is the slowest
    co.plan_once()
    assert co.latest_record.measured_ttft_ms == pytest.approx(400.0)
    await asyncio.sleep(0.35)  # every sample ages out of the window
    co.plan_once()
    assert co.latest_record.measured_ttft_ms is None
    co.users.record_ttft(0.03)
    co.plan_once()
    assert co.latest_record.measured_ttft_ms == pytest.approx(30.0)
