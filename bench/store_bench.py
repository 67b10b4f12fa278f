"""Adapter store figures: record size, commit latency (both backends, with/without snapshot), replay speed.

    .venv/bin/python bench/store_bench.py --json      # last stdout line is the JSON summary

Runs against the Redis on 127.0.0.1:6379 (unique key prefix, deleted afterwards) and a temporary SQLite/blob
directory. The adapter is rank 8 on q_proj/v_proj of the OPT-125m shape (built locally once, cached).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path

import redis
import torch

from adapters_store import AdapterState, LocalBlobStore, VersionRecord, encode_record, open_store
from adapters_store.blobs import content_key, sha256_hex
from adapters_store.snapshots import encode_state
from scheduler.models.tiny import ensure_model
from scheduler.zo import mezo
from scheduler.zo.directions import derive_seeds
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir

REDIS_URL = "redis://127.0.0.1:6379/0"


def mezo_record(step: int, num_directions: int) -> VersionRecord:
    return VersionRecord(
        version=step, parent=step - 1, step=step, optimizer="mezo-sgd",
        seeds=tuple(derive_seeds(0, step, num_directions)), coeffs=tuple(0.1 * (i + 1) for i in range(num_directions)),
        lr=1e-6, weight_decay=0.0, eps=1e-3, batch_id=step * 16,
    )


def record_sizes() -> dict[str, int]:
    sizes = {f"mezo_q{q}": len(encode_record(mezo_record(123_456, q))) for q in (1, 4, 16)}
    adam = VersionRecord(
        version=10**6, parent=10**6 - 1, step=10**6, optimizer="zo-adam", seeds=tuple(range(8)), coeffs=(0.1,) * 8,
        lr=1e-4, weight_decay=0.01, eps=1e-3, hparams=(("beta1", 0.9), ("beta2", 0.999)), batch_id=2**40,
    )
    sizes["zo_adam_q8_2hparams"] = len(encode_record(adam))
    return sizes


def percentiles_ms(samples_s: list[float]) -> dict[str, float]:
    ordered = sorted(samples_s)
    p99 = ordered[min(len(ordered) - 1, int(round(0.99 * (len(ordered) - 1))))]
    return {"p50_ms": round(statistics.median(ordered) * 1e3, 3), "p99_ms": round(p99 * 1e3, 3), "n": len(ordered)}


async def bench_backend(redis_url: str | None, layout, num_plain: int, num_snapshot: int) -> dict:
    prefix = f"zoserve-bench:store:{uuid.uuid4().hex}:"
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(redis_url, Path(tmp), key_prefix=prefix, snapshot_every=10**9)
        try:
            theta = initial_state(layout, seed=0)
            meta = await store.create_adapter("bench", base_model="opt-125m-shape", rank=layout.shape.rank,
                                              alpha=layout.shape.alpha, target_modules=layout.shape.target_modules,
                                              initial=AdapterState(theta))
            head = meta.head
            plain, snap = [], []
            for _ in range(num_plain):
                record = mezo_record(head + 1, 1)
                t0 = time.perf_counter()
                await store.commit("bench", record)
                plain.append(time.perf_counter() - t0)
                head += 1
            for _ in range(num_snapshot):
                next(iter(theta.values())).add_(1e-3)  # distinct content per snapshot, outside the timing
                record = mezo_record(head + 1, 1)
                t0 = time.perf_counter()
                await store.commit("bench", record, AdapterState(theta))
                snap.append(time.perf_counter() - t0)
                head += 1
            snapshot_bytes = (await store.metadata.list_snapshots("bench"))[-1].num_bytes
        finally:
            await store.close()
            if redis_url:
                client = redis.Redis.from_url(redis_url)
                keys = list(client.scan_iter(match=f"{prefix}*"))
                if keys:
                    client.delete(*keys)
                client.close()
    return {"commit": percentiles_ms(plain), "commit_with_snapshot": percentiles_ms(snap),
            "snapshot_bytes": snapshot_bytes}


async def bench_replay(layout, num_steps: int, num_directions: int) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        store = open_store(None, Path(tmp), snapshot_every=10**9)
        try:
            await store.create_adapter("replay", base_model="opt-125m-shape", rank=layout.shape.rank,
                                       alpha=layout.shape.alpha, target_modules=layout.shape.target_modules,
                                       initial=AdapterState(initial_state(layout, seed=0)))
            for step in range(1, num_steps + 1):
                await store.commit("replay", mezo_record(step, num_directions))

            def apply(theta, optimizer_state, record):
                mezo.apply_update(theta, layout, record.seeds, record.coeffs, record.lr, record.weight_decay)

            t0 = time.perf_counter()
            await store.materialize("replay", num_steps, apply)
            elapsed_s = time.perf_counter() - t0
        finally:
            await store.close()
    return {"steps": num_steps, "num_directions": num_directions, "seconds": round(elapsed_s, 3),
            "steps_per_s": round(num_steps / elapsed_s, 1)}


async def snapshot_parts(layout, num_samples: int = 30) -> dict[str, float]:
    """Median cost of the pieces of a snapshot commit (the put includes its thread hop)."""
    state = AdapterState(initial_state(layout, seed=0))
    data = encode_state(state)

    def median_ms(fn) -> float:
        samples = []
        for _ in range(num_samples):
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
        return round(statistics.median(samples) * 1e3, 3)

    with tempfile.TemporaryDirectory() as tmp:
        blobs = LocalBlobStore(Path(tmp))
        key = content_key(sha256_hex(data))
        samples = []
        for _ in range(num_samples):
            t0 = time.perf_counter()
            await blobs.put(key, data)
            samples.append(time.perf_counter() - t0)
        put_ms = round(statistics.median(samples) * 1e3, 3)
    return {"encode_safetensors_ms": median_ms(lambda: encode_state(state)),
            "sha256_ms": median_ms(lambda: sha256_hex(data)), "blob_put_fsync_ms": put_ms}


async def main_async(args) -> dict:
    layout = layout_for_model_dir(ensure_model("opt-125m-shape"), LoraShape(8, 16.0, ("q_proj", "v_proj")))
    result = {
        "record_bytes": record_sizes(),
        "adapter": {"model": "opt-125m-shape", "rank": 8, "targets": ["q_proj", "v_proj"],
                    "num_params": layout.num_params},
        "torch_threads": torch.get_num_threads(),
        "sqlite": await bench_backend(None, layout, args.num_commits, args.num_snapshots),
        "redis": await bench_backend(REDIS_URL, layout, args.num_commits, args.num_snapshots),
        "snapshot_parts": await snapshot_parts(layout),
        "replay": [await bench_replay(layout, args.num_replay, q) for q in (1, 4)],
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", action="store_true", help="print only the JSON summary")
    parser.add_argument("--num-commits", type=int, default=1000)
    parser.add_argument("--num-snapshots", type=int, default=50)
    parser.add_argument("--num-replay", type=int, default=100)
    args = parser.parse_args()
    result = asyncio.run(main_async(args))
    if args.json:
        print(json.dumps(result))
    else:
        print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
