"""A service restarted mid-job (a second app on the same engine binding and the same data dir) resumes the
job from its adapter's head."""

from __future__ import annotations

from service_harness import ROOT_KEY, client_for, job_body, running_service, service_settings, wait_for_job


async def test_restart_resumes_running_job_from_head(engine, tmp_path):
    settings = service_settings(tmp_path / "data")

    async with running_service(settings, engine) as url, client_for(url, ROOT_KEY) as client:
        job_id = (await client.post("/v1/jobs", json=job_body("restart-me", 30))).json()["id"]
        await wait_for_job(client, job_id, lambda j: j["step"] >= 3)
        before = (await client.get(f"/v1/jobs/{job_id}")).json()
    # The first app's runtime is shut down: no more steps from it.
    head_before = before["version"]
    assert before["status"] == "running" and head_before >= 3

    async with running_service(settings, engine) as url, client_for(url, ROOT_KEY) as client:
        after = (await client.get(f"/v1/jobs/{job_id}")).json()
        assert after["status"] in ("queued", "running"), after
        assert after["step"] >= before["step"], "progress survives the restart"
        adapter = (await client.get("/v1/adapters/restart-me")).json()
        assert adapter["head_version"] >= head_before

        done = await wait_for_job(client, job_id, lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
        assert done["status"] == "succeeded" and done["step"] == 30, done
        # Continued from the head, not from scratch: versions are one linear chain 0..30.
        versions = (await client.get("/v1/adapters/restart-me/versions", params={"limit": 1000})).json()["data"]
        assert [v["version"] for v in versions] == list(range(31))
        assert all(v["parent"] == v["version"] - 1 for v in versions[1:])
        events = (await client.get(f"/v1/jobs/{job_id}/events")).json()["data"]
        assert any("restart" in e["message"] for e in events), events

        served = (await client.post("/v1/completions", json={"model": "restart-me", "prompt": "x", "max_tokens": 1})).json()
        assert served["system_fingerprint"] == "zoserve:restart-me@30"

