"""CPU time of one co-scheduler round (`CoScheduler.plan_once`) in the co-serving benchmark's shape.

The co-scheduler plans a round at every event (a user arrives or gets its first token, a chunk enters or
returns, a step ends): hundreds a second while users and ZO jobs share the engine, all on the service's
event loop that user requests wait behind. This times rounds over a fixed state like that benchmark's
together phase: 15 slots (three served adapters' double buffers + two more, two jobs holding two probe slots
each), eight users decoding, 250 first-token samples in the window, four chunks waiting each round.

    .venv/bin/python bench/planner_round.py [--rounds 3000] [--repeats 5] [--json]

Prints microseconds per round, the median and the spread of the repeats (with --json, as a JSON last line).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import time

from scheduler.adapter_host import SlotPool
from scheduler.coscheduler import CoScheduler, _Chunk
from scheduler.coscheduler_config import CoSchedulerConfig
from scheduler.planning import ChunkRequest
from scheduler.user_latency import UserRequestHandle


async def _round_us(num_rounds: int) -> float:
    rng = random.Random(0)
    slot_ids = tuple(range(1, 16))
    pool = SlotPool(slot_ids)
    serving = [(slot, f"users-{i // 2}#buffer{i % 2}", rng.randint(0, 3)) for i, slot in enumerate(slot_ids[:10])]
    pool.take_specific(tuple(slot for slot, _, _ in serving))
    co = CoScheduler(CoSchedulerConfig(target_ttft_ms=22.0), pool, slot_ids, lambda: serving)
    now = time.monotonic()
    for i in range(250):
        co.users.record_ttft(rng.random() * 0.040, at_s=now - i * 0.02)
    for i in range(8):
        handle = UserRequestHandle(29, started_s=now - 0.1, first_token_s=now, num_output_tokens=8)
        co.users.add(handle)
    steps = []
    for job_id, weight in (("zo-w1", 1.0), ("zo-w2", 2.0)):  # each job's step granted: two probe slots
        step = co.step(job_id, weight, 1200, 2)
        entering = asyncio.ensure_future(step.__aenter__())
        await asyncio.sleep(0)  # the demand is registered
        co.plan_once()
        await asyncio.wait_for(entering, 5.0)
        steps.append(step)
    try:
        assert all(len(held) == 2 for _, held in co._in_flight.values()) and len(co._in_flight) == 2
        chunk_ids = iter(range(10**9))
        started = time.perf_counter()
        for _ in range(num_rounds):
            for i in range(4):
                request_id = next(chunk_ids)
                co._chunks_waiting[request_id] = _chunk(request_id, "zo-w2" if i % 2 else "zo-w1")
            co.plan_once()
            co._chunks_waiting.clear()
            co._chunks_in_flight.clear()
        return (time.perf_counter() - started) / num_rounds * 1e6
    finally:
        for step in reversed(steps):
            await step.__aexit__(None, None, None)


def _chunk(request_id: int, job_id: str) -> _Chunk:
    return _Chunk(ChunkRequest(request_id, job_id, 128))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3000)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    runs = [asyncio.run(_round_us(args.rounds)) for _ in range(args.repeats)]
    print(f"co-scheduler round: {statistics.median(runs):.0f} us median over {args.repeats} repeats of "
          f"{args.rounds} rounds (min {min(runs):.0f}, max {max(runs):.0f})")
    if args.json:
        print(json.dumps({
            "benchmark": "planner_round", "rounds": args.rounds, "round_us_median": statistics.median(runs),
            "round_us_min": min(runs), "round_us_max": max(runs),
        }))


if __name__ == "__main__":
    main()
