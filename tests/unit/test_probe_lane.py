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
