"""How long creating a job with a large inline dataset stops the service's event loop.

A `POST /v1/jobs` body with its examples inline is decoded and checked on the event loop: while that runs, no
user's token is streamed and no ZO step moves. This parses SST-2's training split (67,349 rows, 5.4 MB of
JSON) as a job body, the way the route does (FastAPI decodes and checks the body, the route then checks the
example rows in slices: service/jobs/inline_examples.py), and the way a body model that checks its rows
itself would (one pydantic call), each with a 1 ms ticker on the loop. The GC is set up as the service sets
it (service/heap.py: heap frozen, full collections every 1000 generation-1 collections).

    .venv/bin/python bench/job_body_loop.py [--rows N] [--repeats 3] [--json]

Prints, per way, the wall time to a checked body and the longest gap between two ticks (the worst stall a
user's stream would see), medians over the repeats; with --json, as a JSON last line.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pydantic import BaseModel  # noqa: E402

from service.examples import ExampleIn  # noqa: E402
from service.jobs.inline_examples import with_checked_examples  # noqa: E402
from service.jobs.schemas import JobCreate  # noqa: E402


class _CheckedInOneCall(BaseModel):
    """The rows checked by the body model itself, as `JobCreate` did before session 20."""

    adapter: str
    training_data: list[ExampleIn]


def _rows(limit: int) -> list[dict]:
    data_dir = Path(os.environ.get("ZOSERVE_TASK_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    with (data_dir / "sst2" / "train.tsv").open(newline="") as f:
        reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(reader)
        return [{"text": row[0], "label": int(row[1])} for _, row in zip(range(limit), reader)]


async def _route(raw: bytes) -> int:
    body = await with_checked_examples(JobCreate.model_validate(json.loads(raw)))
    return len(body.training_data)


async def _one_call(raw: bytes) -> int:
    return len(_CheckedInOneCall.model_validate(json.loads(raw)).training_data)


async def _measure(parse, raw: bytes) -> tuple[float, float]:
    gaps: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        last = time.perf_counter()
        while not stop.is_set():
            await asyncio.sleep(0.001)
            now = time.perf_counter()
            gaps.append(now - last)
            last = now

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0.05)
    started = time.perf_counter()
    await parse(raw)
    wall = time.perf_counter() - started
    await asyncio.sleep(0.02)
    stop.set()
    await task
    return 1e3 * wall, 1e3 * max(gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=100_000, help="at most this many SST-2 training rows")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows = _rows(args.rows)
    raw = json.dumps({"adapter": "inline-bench", "training_data": rows}).encode()
    gc.collect()
    gc.freeze()
    gc.set_threshold(700, 10, 1000)
    result: dict = {"benchmark": "job_body_loop", "rows": len(rows), "body_mb": round(len(raw) / 1e6, 2)}
    for name, parse in (("route_in_slices", _route), ("one_pydantic_call", _one_call)):
        runs = [asyncio.run(_measure(parse, raw)) for _ in range(args.repeats)]
        result[name] = {
            "wall_ms": round(statistics.median(w for w, _ in runs), 1),
            "longest_loop_gap_ms": round(statistics.median(g for _, g in runs), 1),
        }
        print(f"{name:18s} checked in {result[name]['wall_ms']} ms; longest gap between 1 ms ticks "
              f"{result[name]['longest_loop_gap_ms']} ms", flush=True)
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
