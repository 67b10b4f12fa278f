"""The probe lane hands out one submission turn per event-loop turn, in order, and survives cancellations."""

from __future__ import annotations

import asyncio

from scheduler.probe_lane import ProbeLane


async def _probe(lane: ProbeLane | None, index: int, order: list) -> None:
    if lane is not None:
        await lane.turn()
    order.append(("probe", index))


async def _ticker(order: list, stop: asyncio.Event) -> None:
    """Stands for user work on the loop: one short callback every loop turn."""
    while not stop.is_set():
        order.append("tick")
        await asyncio.sleep(0)


async def _run_burst(lane: ProbeLane | None, num_probes: int) -> list:
    order: list = []
    stop = asyncio.Event()
    ticker = asyncio.create_task(_ticker(order, stop))
    await asyncio.sleep(0)  # the ticker is running before the burst becomes ready
    await asyncio.gather(*(_probe(lane, i, order) for i in range(num_probes)))
    stop.set()
    await ticker
    return order


def _longest_probe_run(order: list) -> int:
    longest = run = 0
    for item in order:
        run = run + 1 if item != "tick" else 0
        longest = max(longest, run)
    return longest


async def test_a_burst_without_the_lane_runs_back_to_back():
    order = await _run_burst(None, 40)
    assert _longest_probe_run(order) == 40  # the situation the lane exists for


async def test_the_lane_interleaves_other_loop_work_between_submissions():
    lane = ProbeLane()
    order = await _run_burst(lane, 40)
    assert _longest_probe_run(order) == 1
    assert lane.num_granted == 40
    assert lane.num_waiting == 0


async def test_turns_are_granted_in_the_order_asked():
    lane = ProbeLane()
    order: list = []
    await asyncio.gather(*(_probe(lane, i, order) for i in range(25)))
    assert [i for _, i in order] == list(range(25))


async def test_a_cancelled_waiter_does_not_block_the_others():
    lane = ProbeLane()
    order: list = []
    tasks = [asyncio.create_task(_probe(lane, i, order)) for i in range(10)]
    await asyncio.sleep(0)  # all ten are waiting for their turn
    tasks[3].cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert isinstance(results[3], asyncio.CancelledError)
    assert [i for _, i in order] == [0, 1, 2, 4, 5, 6, 7, 8, 9]
    assert lane.num_granted == 9


async def test_the_lane_serves_again_after_it_went_idle():
    lane = ProbeLane()
    order: list = []
    await asyncio.gather(*(_probe(lane, i, order) for i in range(3)))
    await asyncio.sleep(0.01)  # the driver has finished
    await asyncio.gather(*(_probe(lane, i, order) for i in range(3, 6)))
    assert [i for _, i in order] == list(range(6))
    assert lane.num_granted == 6


async def test_a_user_hold_spaces_probe_turns_and_its_release_lets_them_go():
    lane = ProbeLane(max_hold_gap_s=0.02)
    loop = asyncio.get_running_loop()
    granted: list[float] = []

    async def probe() -> None:
        await lane.turn()
        granted.append(loop.time())

    hold = lane.hold()
    started = loop.time()
    tasks = [asyncio.create_task(probe()) for _ in range(6)]
    await asyncio.sleep(0.07)  # held: one turn at once, then one per 20 ms
    assert 3 <= len(granted) <= 5
    gaps = [b - a for a, b in zip(granted, granted[1:])]
    assert all(gap >= 0.018 for gap in gaps), gaps
    assert lane.num_granted_while_held == len(granted)
    hold.release()
    hold.release()  # idempotent: one hold, one release
    assert lane.num_holds == 0
    await asyncio.gather(*tasks)
    assert len(granted) == 6
    assert granted[-1] - started < 0.1  # the rest went right after the release, not at 20 ms each


async def test_the_lane_is_not_held_once_every_hold_is_released():
    lane = ProbeLane(max_hold_gap_s=1.0)
    first, second = lane.hold(), lane.hold()
    first.release()
    assert lane.num_holds == 1
    waiter = asyncio.create_task(lane.turn())
    await asyncio.sleep(0.01)
    # The first turn after a quiet spell goes at once; the rest would wait up to a second while held.
    assert waiter.done()
    second_waiter = asyncio.create_task(lane.turn())
    await asyncio.sleep(0.01)
    assert not second_waiter.done()
    second.release()
    await asyncio.wait_for(second_waiter, 0.5)
    assert lane.num_granted == 2


def test_a_negative_hold_gap_is_refused():
    import pytest

    with pytest.raises(ValueError, match="max_hold_gap_s"):
        ProbeLane(max_hold_gap_s=-1.0)
