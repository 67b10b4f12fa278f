"""An adapter keeps serving well-formed completions while its job trains, and keeps adapting."""

from __future__ import annotations

import asyncio

from service_harness import job_body as _job_body
from service_harness import wait_for_job as _wait_for


async def test_completions_served_while_job_trains(client):
    created = await client.post("/v1/jobs", json=_job_body("live-sst2", max_steps=30))
    assert created.status_code == 201, created.text
    job_id = created.json()["id"]
    await _wait_for(client, job_id, lambda j: j["status"] == "running" and j["step"] >= 1)

    fingerprints, steps_seen = [], []
    for round_index in range(6):
        replies = await asyncio.gather(
            *(
                client.post("/v1/completions", json={"model": "live-sst2", "prompt": f"the movie was {i}", "max_tokens": 8, "temperature": 0})
                for i in range(3)
            )
        )
        for reply in replies:
            assert reply.status_code == 200, reply.text
            body = reply.json()
            assert body["object"] == "text_completion" and body["model"] == "live-sst2"
            choice = body["choices"][0]
            assert isinstance(choice["text"], str) and choice["finish_reason"] in ("length", "stop")
            assert 1 <= body["usage"]["completion_tokens"] <= 8
            fingerprints.append(body["system_fingerprint"])
        steps_seen.append((await client.get(f"/v1/jobs/{job_id}")).json()["step"])

    assert steps_seen[-1] > steps_seen[0], f"the job must keep stepping while serving: {steps_seen}"
    versions = [int(f.rsplit("@", 1)[1]) for f in fingerprints]
    assert versions == sorted(versions) and versions[-1] > versions[0], versions

    done = await _wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed"))
    assert done["status"] == "succeeded", done
    assert done["step"] == 30 and done["version"] == 30
    last = (await client.post("/v1/completions", json={"model": "live-sst2", "prompt": "fine", "max_tokens": 2})).json()
    assert last["system_fingerprint"] == "zoserve:live-sst2@30", "after the job, new requests see the last version"


async def test_streaming_completion_from_adapter(client):
    created = await client.post("/v1/jobs", json=_job_body("live-stream", max_steps=3))
    job_id = created.json()["id"]
    await _wait_for(client, job_id, lambda j: j["status"] == "succeeded")
    async with client.stream("POST", "/v1/completions", json={"model": "live-stream", "prompt": "it was", "max_tokens": 6, "stream": True}) as reply:
        assert reply.status_code == 200
        lines = [line async for line in reply.aiter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    assert len(lines) >= 2


async def test_bad_job_input_is_422_naming_the_field(client):
    body = _job_body("bad-input", max_steps=3)
    body["hyperparameters"]["learning_rate"] = -1
    reply = await client.post("/v1/jobs", json=body)
    assert reply.status_code == 422
    assert reply.json()["error"]["param"] == "hyperparameters.learning_rate"
    body = _job_body("bad-rank", max_steps=3)
    body["lora"]["rank"] = 64
    reply = await client.post("/v1/jobs", json=body)
    assert reply.status_code == 422 and reply.json()["error"]["param"] == "lora.rank"


async def test_unknown_model_and_job_are_404(client):
    reply = await client.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert reply.status_code == 404 and reply.json()["error"]["param"] == "model"
    assert (await client.get("/v1/jobs/job-missing")).status_code == 404


async def test_two_jobs_train_at_once_and_both_adapters_are_served(client):
    ids = []
    for name in ("duo-a", "duo-b"):
        created = await client.post("/v1/jobs", json=_job_body(name, max_steps=12))
        assert created.status_code == 201, created.text
        ids.append(created.json()["id"])
    overlap = False
    for _ in range(600):  # both running and stepping at the same moment, bounded
        jobs = [(await client.get(f"/v1/jobs/{job_id}")).json() for job_id in ids]
        if all(j["status"] == "running" and 1 <= j["step"] < 12 for j in jobs):
            overlap = True
            break
        await asyncio.sleep(0.05)
    assert overlap, "the two jobs never trained at the same time"
    replies = await asyncio.gather(
        *(client.post("/v1/completions", json={"model": m, "prompt": "it was", "max_tokens": 3}) for m in ("duo-a", "duo-b"))
    )
    assert [r.status_code for r in replies] == [200, 200]
    assert [r.json()["system_fingerprint"].split("@")[0] for r in replies] == ["zoserve:duo-a", "zoserve:duo-b"]
    for job_id in ids:
        done = await _wait_for(client, job_id, lambda j: j["status"] in ("succeeded", "failed"))
        assert done["status"] == "succeeded" and done["step"] == 12, done
