"""The two training jobs and the user adapters' set-up jobs, through the jobs API."""

from __future__ import annotations

import asyncio
import time

from scheduler.datasets import load_sst2

JOBS = (("zo-w1", 1.0), ("zo-w2", 2.0))  # (adapter, fair-share weight)


def _rows(split: str, limit: int) -> list[dict]:
    return [{"text": ex.text, "label": ex.label} for ex in load_sst2(split, limit=limit)]


def job_body(
    adapter: str, weight: float, max_steps: int, batch_size: int, q: int, rows: list[dict], options: list[str] | None = None
) -> dict:
    body = {
        "adapter": adapter,
        "hyperparameters": {"learning_rate": 1e-3, "eps": 1e-2, "num_directions": q, "batch_size": batch_size, "max_steps": max_steps},
        "lora": {"rank": 4, "alpha": 8, "target_modules": ["q_proj", "v_proj"]},
        "training_data": rows,
        "seed": 3,
        "weight": weight,
    }
    if options is not None:
        body["objective"] = {"type": "classification", "options": options}
    return body


async def create_job(client, body: dict) -> str:
    reply = await client.post("/v1/jobs", json=body)
    if reply.status_code != 201:
        raise RuntimeError(f"job for {body['adapter']} not created: {reply.status_code} {reply.text}")
    return reply.json()["id"]


async def wait_job(client, job_id: str, predicate, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    next_report = time.monotonic() + 30
    while True:
        job = (await client.get(f"/v1/jobs/{job_id}")).json()
        if predicate(job):
            return job
        if time.monotonic() > next_report:
            print(f"  waiting for {job['adapter']}: {job['status']}, step {job['step']}", flush=True)
            next_report = time.monotonic() + 30
        if job["status"] in ("failed", "cancelled", "succeeded"):
            raise RuntimeError(f"job {job_id} ended before the benchmark expected: {job}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {job_id} not ready within {timeout_s} s: {job}")
        await asyncio.sleep(0.2)


async def job_steps(client, job_id: str) -> list[dict]:
    """Every step record of a job, page by page (`GET /v1/jobs/{id}/metrics` returns at most 10,000 a call)."""
    steps: list[dict] = []
    while True:
        params = {"after_step": steps[-1]["step"] if steps else 0, "limit": 10_000}
        page = (await client.get(f"/v1/jobs/{job_id}/metrics", params=params)).json()
        steps += page["steps"]
        if not page["has_more"]:
            return steps
