"""Every control-plane route over real HTTP on the real engine: happy paths, every error status, the job
state machine, pause/resume, auth scopes, uploads, adapter versions, rollback and download."""

from __future__ import annotations

import asyncio
import io
import json
import math
import tarfile

from service_harness import job_body, sst2_rows, wait_for_job

FINAL = ("succeeded", "failed", "cancelled")


def _jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


async def _upload(client, data: bytes, name: str = "train.jsonl"):
    return await client.post("/v1/files", files={"file": (name, data, "application/jsonl")}, data={"purpose": "fine-tune"})


# ---------------------------------------------------------------- auth and open endpoints


async def test_health_ready_and_metrics_are_open(anonymous):
    assert (await anonymous.get("/healthz")).json() == {"status": "ok"}
    assert (await anonymous.get("/readyz")).status_code == 200
    metrics = await anonymous.get("/metrics")
    assert metrics.status_code == 200 and "zoserve_http_requests_total" in metrics.text


async def test_keys_and_scopes(anonymous, admin, user, service_url):
    import httpx

    async with httpx.AsyncClient(base_url=service_url, headers={"Authorization": "Bearer wrong"}) as wrong:
        for reply in (await anonymous.get("/v1/jobs"), await wrong.get("/v1/jobs"),
                      await anonymous.post("/v1/completions", json={"model": "base", "prompt": "x"}),
                      await wrong.get("/v1/models")):
            assert reply.status_code == 401, reply.text
            assert reply.json()["error"]["type"] == "authentication_error"
            assert reply.headers["www-authenticate"] == "Bearer"
    forbidden = [await user.get("/v1/jobs"), await user.get("/v1/adapters"), await user.post("/v1/files"),
                 await admin.get("/v1/models"), await admin.post("/v1/chat/completions", json={})]
    assert [r.status_code for r in forbidden] == [403] * 5
    assert (await admin.get("/v1/jobs")).status_code == 200
    assert (await user.get("/v1/models")).status_code == 200


# ---------------------------------------------------------------- uploads


async def test_file_upload_and_its_errors(admin):
    created = await _upload(admin, _jsonl(sst2_rows(16)))
    assert created.status_code == 201, created.text
    meta = created.json()
    assert meta["object"] == "file" and meta["num_examples"] == 16 and meta["kind"] == "classification"
    assert (await admin.get(f"/v1/files/{meta['id']}")).json()["id"] == meta["id"]
    assert meta["id"] in [f["id"] for f in (await admin.get("/v1/files")).json()["data"]]

    too_big = await _upload(admin, b'{"text": "x", "label": 0}\n' * 20_000)
    assert too_big.status_code == 413 and too_big.json()["error"]["param"] == "file"
    for bad in (b"not json\n", b'{"text": "a", "label": -1}\n', b'{"text": "a", "label": 0}\n{"prompt": "p", "completion": "c"}\n', b"\n"):
        reply = await _upload(admin, bad)
        assert reply.status_code == 422 and reply.json()["error"]["param"] == "file", (bad, reply.text)
    assert (await admin.get("/v1/files/file-000000000000000000000000")).status_code == 404
    assert (await admin.get("/v1/files/..%2Fetc")).status_code == 404


# ---------------------------------------------------------------- jobs: input errors


_REWARD_ROWS = [{"prompt": "a film", "completion": "great"}]


async def test_job_input_errors_name_the_field(admin):
    cases = [
        ({"hyperparameters": {"learning_rate": -1}}, "hyperparameters.learning_rate"),
        ({"lora": {"rank": 64, "alpha": 8, "target_modules": ["q_proj"]}}, "lora.rank"),
        ({"lora": {"rank": 4, "alpha": 8, "target_modules": ["k_proj"]}}, "lora.target_modules"),
        ({"method": "adamw"}, "method"),
        ({"method": "zo-sgd-mmt", "method_params": {"momentum": 1.5}}, "momentum"),  # the runtime names the prefix
        ({"method": "lozo-bank", "method_params": {"rank": 4}}, "method_params.rank"),  # not below lora.rank 4
        ({"adapter": "../etc"}, "adapter"),
        ({"training_data": [{"text": "a", "label": 7}]}, "training_data.label"),
        ({"training_data": [{"prompt": "a", "completion": "b"}]}, "training_data.0"),
        ({"training_file": "file-000000000000000000000000"}, "training_file"),  # and training_data: both
        ({"training_file": "file-000000000000000000000000", "training_data": None}, "training_file"),  # unknown
        ({"training_data": None}, "training_data"),
        ({"training_data": []}, "training_data"),
        ({"training_data": "rows"}, "training_data"),
        ({"training_data": [{"text": "a film", "label": 0}] * 3000 + [{"text": "", "label": 0}]}, "training_data.3000"),
        ({"validation_data": [{"text": "a film"}]}, "validation_data.0"),
        ({"objective": {"type": "classification", "template": "no slot", "options": [" a", " b"]}}, "objective.template"),
        ({"objective": {"type": "regression"}}, "objective"),
        ({"objective": {"type": "reward", "template": "no slot"}, "training_data": _REWARD_ROWS}, "objective.template"),
        ({"objective": {"type": "reward", "match": "regex"}, "training_data": _REWARD_ROWS}, "match"),
        ({"objective": {"type": "reward", "max_new_tokens": 0}, "training_data": _REWARD_ROWS}, "max_new_tokens"),
        ({"objective": {"type": "reward", "max_new_tokens": 257}, "training_data": _REWARD_ROWS}, "max_new_tokens"),
        ({"objective": {"type": "reward", "stop": [""]}, "training_data": _REWARD_ROWS}, "objective.stop"),
        ({"objective": {"type": "reward"}}, "training_data.0"),  # {text, label} rows
        ({"objective": {"type": "reward"}, "training_data": [{"prompt": "a", "completion": "?!"}]}, "training_data.0.completion"),
        ({"seed": -1}, "seed"),
        ({"direction": {"block_scales": {"nope.lora_A.weight": 1.0}}}, "direction.block_scales"),
        ({"direction": {"sparse_mask": {"fraction": 0}}}, "fraction"),
        ({"direction": {"sparse_mask": {"fraction": 0.1}}, "method": "lozo"}, "direction.sparse_mask"),
        ({"direction": {"sparse_mask": {"fraction": 0.1}}, "hyperparameters": {"weight_decay": 0.1}}, "hyperparameters.weight_decay"),
    ]
    for overrides, field in cases:
        body = job_body("bad-input", 3)
        for key, value in overrides.items():
            if isinstance(value, dict) and key == "hyperparameters":
                body[key] = {**body[key], **value}
            else:
                body[key] = value
        body = {k: v for k, v in body.items() if v is not None}
        reply = await admin.post("/v1/jobs", json=body)
        assert reply.status_code == 422, (overrides, reply.text)
        param = reply.json()["error"]["param"]
        assert param is not None and (param.startswith(field) or param.endswith(f".{field}")), (overrides, reply.json())
    assert (await admin.get("/v1/jobs", params={"limit": 0})).status_code == 422


async def test_unknown_job_is_404_everywhere(admin):
    for method, path in [("GET", ""), ("POST", "/cancel"), ("POST", "/pause"), ("POST", "/resume"),
                         ("GET", "/events"), ("GET", "/metrics")]:
        reply = await admin.request(method, f"/v1/jobs/job-missing{path}")
        assert reply.status_code == 404, (path, reply.text)
        assert reply.json()["error"]["type"] == "not_found_error"


# ---------------------------------------------------------------- jobs: state machine, pause, metrics


async def _steps(admin, job_id: str) -> int:
    return (await admin.get(f"/v1/jobs/{job_id}")).json()["step"]


async def test_job_lifecycle_pause_resume_events_and_metrics(admin, client):
    upload = (await _upload(admin, _jsonl(sst2_rows(64)))).json()
    body = job_body("api-life", 40, training_file=upload["id"], validation_data=sst2_rows(8), eval_every=5)
    del body["training_data"]
    created = await admin.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = created.json()
    assert job["object"] == "zoserve.job" and job["status"] in ("queued", "running")
    job_id = job["id"]

    # One active job per adapter.
    second = await admin.post("/v1/jobs", json=job_body("api-life", 3))
    assert second.status_code == 409 and second.json()["error"]["type"] == "conflict_error"

    await wait_for_job(admin, job_id, lambda j: j["status"] == "running" and j["step"] >= 2)
    # Examples appended to the running job's stream.
    appended = await admin.post("/v1/adapters/api-life/examples", json={"examples": sst2_rows(4)})
    assert appended.status_code == 200 and appended.json()["num_appended"] >= 4, appended.text

    paused = await admin.post(f"/v1/jobs/{job_id}/pause")
    assert paused.status_code == 200 and paused.json()["status"] == "paused"
    await asyncio.sleep(1.0)  # a step already in the engine may still land
    frozen = await _steps(admin, job_id)
    await asyncio.sleep(3.0)
    assert await _steps(admin, job_id) == frozen, "a paused job must not step"
    assert (await admin.get(f"/v1/jobs/{job_id}")).json()["status"] == "paused"

    resumed = await admin.post(f"/v1/jobs/{job_id}/resume")
    assert resumed.json()["status"] in ("running", "queued")
    await wait_for_job(admin, job_id, lambda j: j["step"] > frozen + 1, timeout_s=120)

    done = await wait_for_job(admin, job_id, lambda j: j["status"] in FINAL)
    assert done["status"] == "succeeded" and done["step"] == 40, done

    events = (await admin.get(f"/v1/jobs/{job_id}/events")).json()["data"]
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    statuses = [e["status"] for e in events if e["kind"] == "status"]
    for expected in ("validating", "queued", "running", "paused", "succeeded"):
        assert expected in statuses, (expected, statuses)
    assert statuses.index("paused") < len(statuses) - 1 - statuses[::-1].index("running")
    later = (await admin.get(f"/v1/jobs/{job_id}/events", params={"after": seqs[-2]})).json()["data"]
    assert [e["seq"] for e in later] == [seqs[-1]]

    metrics = (await admin.get(f"/v1/jobs/{job_id}/metrics")).json()
    assert [m["step"] for m in metrics["steps"]] == list(range(1, 41)) and not metrics["has_more"]
    first = metrics["steps"][0]
    assert first["loss"] > 0 and first["projected_grad_norm"] >= 0 and first["steps_per_s"] > 0
    assert len(metrics["evals"]) >= 8 and all(0 <= e["accuracy"] <= 1 for e in metrics["evals"])
    assert metrics["steps_per_s"] > 0
    # Paged: the same steps and evaluations, each once, in two calls.
    head = (await admin.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 15})).json()
    tail = (await admin.get(f"/v1/jobs/{job_id}/metrics", params={"after_step": 15, "limit": 100})).json()
    assert head["has_more"] and not tail["has_more"]
    assert head["steps"] + tail["steps"] == metrics["steps"] and head["evals"] + tail["evals"] == metrics["evals"]
    assert (await admin.get(f"/v1/jobs/{job_id}/metrics", params={"limit": 0})).status_code == 422

    # Pause/resume/cancel of a finished job: 409, and the job stays as it is.
    for action in ("cancel", "pause", "resume"):
        conflict = await admin.post(f"/v1/jobs/{job_id}/{action}")
        assert conflict.status_code == 409, conflict.text
        assert "cannot" in conflict.json()["error"]["message"]
    assert (await admin.get(f"/v1/jobs/{job_id}")).json()["status"] == "succeeded"

    # The finished adapter is served, at its head, and each version can be pinned.
    latest = (await client.post("/v1/completions", json={"model": "api-life", "prompt": "it was", "max_tokens": 2})).json()
    assert latest["system_fingerprint"] == "zoserve:api-life@40"
    pinned = (await client.post("/v1/completions", json={"model": "api-life@3", "prompt": "it was", "max_tokens": 2})).json()
    assert pinned["system_fingerprint"] == "zoserve:api-life@3"


async def test_cancel_and_list_pagination(admin):
    # One job at a time: the test engine's 7 slots hold one job's serving buffers and probes, not two.
    ids = []
    for name in ("api-cancel-a", "api-cancel-b"):
        reply = await admin.post("/v1/jobs", json=job_body(name, 10_000))
        assert reply.status_code == 201, reply.text
        ids.append(reply.json()["id"])
        await wait_for_job(admin, ids[-1], lambda j: j["step"] >= 1)
        cancelled = await admin.post(f"/v1/jobs/{ids[-1]}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    assert (await admin.post(f"/v1/jobs/{ids[0]}/resume")).status_code == 409
    assert (await admin.get(f"/v1/jobs/{ids[0]}")).json()["status"] == "cancelled"
    events = (await admin.get(f"/v1/jobs/{ids[0]}/events")).json()["data"]
    assert events[-1]["status"] == "cancelled"

    everything = (await admin.get("/v1/jobs", params={"limit": 1000})).json()
    assert {j["id"] for j in everything["data"]} >= set(ids) and not everything["has_more"]
    pages, offset = [], 0
    while True:
        page = (await admin.get("/v1/jobs", params={"offset": offset, "limit": 1})).json()
        pages += [j["id"] for j in page["data"]]
        offset += 1
        if not page["has_more"]:
            break
    assert pages == [j["id"] for j in everything["data"]]
    # A cancelled job frees its adapter for a new job.
    again = await admin.post("/v1/jobs", json=job_body("api-cancel-a", 1))
    assert again.status_code == 201
    await wait_for_job(admin, again.json()["id"], lambda j: j["status"] in FINAL)


# ---------------------------------------------------------------- adapters


async def test_adapters_versions_rollback_download(admin, client):
    job = (await admin.post("/v1/jobs", json=job_body("api-adapter", 6))).json()
    await wait_for_job(admin, job["id"], lambda j: j["status"] == "succeeded")

    listed = (await admin.get("/v1/adapters")).json()["data"]
    assert "api-adapter" in [a["name"] for a in listed]
    adapter = (await admin.get("/v1/adapters/api-adapter")).json()
    assert adapter["head_version"] == 6 and adapter["rank"] == 4 and adapter["active_job_id"] is None

    versions = (await admin.get("/v1/adapters/api-adapter/versions")).json()
    assert [v["version"] for v in versions["data"]] == list(range(7)) and not versions["has_more"]
    assert versions["data"][0]["kind"] == "initial" and versions["data"][3]["parent"] == 2
    page = (await admin.get("/v1/adapters/api-adapter/versions", params={"offset": 2, "limit": 2})).json()
    assert [v["version"] for v in page["data"]] == [2, 3] and page["has_more"]

    rolled = await admin.post("/v1/adapters/api-adapter/rollback", json={"version": 2})
    assert rolled.status_code == 200, rolled.text
    assert rolled.json()["head_version"] == 7
    tail = (await admin.get("/v1/adapters/api-adapter/versions", params={"offset": 7})).json()["data"]
    assert tail[0]["kind"] == "rollback"
    served = (await client.post("/v1/completions", json={"model": "api-adapter", "prompt": "x", "max_tokens": 1})).json()
    assert served["system_fingerprint"] == "zoserve:api-adapter@7"

    download = await admin.get("/v1/adapters/api-adapter/versions/4/download")
    assert download.status_code == 200 and download.headers["content-type"] == "application/gzip"
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        names = tar.getnames()
        config = json.load(tar.extractfile(next(n for n in names if n.endswith("adapter_config.json"))))
    assert any(n.endswith("adapter_model.safetensors") for n in names), names
    assert config["r"] == 4

    # 404s and 422s
    assert (await admin.get("/v1/adapters/nope")).status_code == 404
    assert (await admin.get("/v1/adapters/nope/versions")).status_code == 404
    assert (await admin.get("/v1/adapters/api-adapter/versions/99/download")).status_code == 404
    assert (await admin.get("/v1/adapters/nope/versions/0/download")).status_code == 404
    ahead = await admin.post("/v1/adapters/api-adapter/rollback", json={"version": 99})
    assert ahead.status_code == 422 and ahead.json()["error"]["param"] == "version"  # not earlier than the head
    assert (await admin.post("/v1/adapters/nope/rollback", json={"version": 0})).status_code == 404
    negative = await admin.post("/v1/adapters/api-adapter/rollback", json={"version": -1})
    assert negative.status_code == 422 and negative.json()["error"]["param"] == "version"
    # No active job on the adapter: nothing to feed.
    idle = await admin.post("/v1/adapters/api-adapter/examples", json={"examples": sst2_rows(2)})
    assert idle.status_code == 404
    assert (await admin.post("/v1/adapters/api-adapter/examples", json={"examples": []})).status_code == 422


# ---------------------------------------------------------------- data plane errors and metrics


async def test_data_plane_errors(user):
    unknown = await user.post("/v1/completions", json={"model": "nope", "prompt": "x"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
    bad_version = await user.post("/v1/completions", json={"model": "api-adapter@999", "prompt": "x"})
    assert bad_version.status_code == 404 and bad_version.json()["error"]["param"] == "model"
    too_long = await user.post("/v1/completions", json={"model": "base", "prompt": "x", "max_tokens": 4096})
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    hot = await user.post("/v1/completions", json={"model": "base", "prompt": "x", "temperature": 9})
    assert hot.status_code == 422 and hot.json()["error"]["param"] == "temperature"
    no_messages = await user.post("/v1/chat/completions", json={"model": "base", "messages": []})
    assert no_messages.status_code == 422 and no_messages.json()["error"]["param"] == "messages"
    models = [m["id"] for m in (await user.get("/v1/models")).json()["data"]]
    assert models[0] == "base" and "api-adapter" in models
    assert (await user.get("/v1/nothing-here")).status_code == 404


async def test_metrics_count_route_templates(anonymous):
    text = (await anonymous.get("/metrics")).text
    assert 'route="/v1/jobs/{job_id}"' in text and 'route="/v1/completions"' in text
    assert "zoserve_zo_steps_total{adapter=" in text
    assert 'zoserve_training_jobs{state="succeeded"}' in text
    assert "/v1/jobs/job-missing" not in text, "raw paths must never become label values"


async def test_a_rollback_while_its_job_trains_is_where_training_goes_on(admin, engine, tmp_path):
    """The job's next commit finds the store's head moved on: it reloads the rolled-back state and steps from
    there (a step scored meanwhile against the lost state is scored again), and the worker ends holding exactly
    the state the store's head replays to."""
    from safetensors.torch import load as load_tensors
    from safetensors.torch import load_file

    job = (await admin.post("/v1/jobs", json=job_body("api-rollback-live", 40))).json()
    await wait_for_job(admin, job["id"], lambda j: j["step"] >= 4)
    rolled = await admin.post("/v1/adapters/api-rollback-live/rollback", json={"version": 1})
    assert rolled.status_code == 200, rolled.text
    rollback = rolled.json()["head_version"]
    done = await wait_for_job(admin, job["id"], lambda j: j["status"] in FINAL)
    assert done["status"] == "succeeded" and done["step"] == 40, done
    events = (await admin.get(f"/v1/jobs/{job['id']}/events")).json()["data"]
    assert [e["message"] for e in events if e["kind"] == "head"] == [
        f"version {rollback} was committed by someone else; training goes on from it"
    ]

    listed = (await admin.get("/v1/adapters/api-rollback-live/versions", params={"offset": rollback, "limit": 100})).json()
    assert listed["data"][0]["kind"] == "rollback"
    after = listed["data"][1:]
    assert after and all(v["kind"] != "rollback" and v["parent"] == v["version"] - 1 for v in after), after
    head = after[-1]["version"]
    assert done["version"] == head

    worker = load_file(str(await engine.export_peft("api-rollback-live", tmp_path / "worker") / "adapter_model.safetensors"))
    download = await admin.get(f"/v1/adapters/api-rollback-live/versions/{head}/download")
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        member = next(n for n in tar.getnames() if n.endswith("adapter_model.safetensors"))
        stored = load_tensors(tar.extractfile(member).read())
    assert worker.keys() == stored.keys() and all(worker[k].equal(stored[k]) for k in worker)


async def test_reward_objective_job_trains_and_evaluates(admin):
    """A reward job (greedy generation matched against each row's answer) runs end to end over HTTP."""
    rows = [{"prompt": r["text"], "completion": " great" if r["label"] else " terrible"} for r in sst2_rows(16)]
    objective = {"type": "reward", "template": "{prompt} It was", "match": "contains", "max_new_tokens": 3, "stop": ["\n"]}
    body = job_body("api-reward", 3, objective=objective, training_data=rows, validation_data=rows[:4])
    created = await admin.post("/v1/jobs", json=body)
    assert created.status_code == 201, created.text
    job = await wait_for_job(admin, created.json()["id"], lambda j: j["status"] in FINAL)
    assert job["status"] == "succeeded" and job["version"] == 3, job
    metrics = (await admin.get(f"/v1/jobs/{job['id']}/metrics")).json()
    assert [m["step"] for m in metrics["steps"]] == [1, 2, 3]
    assert all(0.0 <= m["loss"] <= 1.0 for m in metrics["steps"])  # 1 − match rate
    (evaluation,) = metrics["evals"]
    assert 0.0 <= evaluation["loss"] <= 1.0 and evaluation["accuracy"] == 1.0 - evaluation["loss"]  # the match rate

    # Rows appended to a running reward job are checked like the job's own.
    long = (await admin.post("/v1/jobs", json=job_body("api-reward", 10_000, objective=objective, training_data=rows))).json()
    bad = await admin.post("/v1/adapters/api-reward/examples", json={"examples": [{"prompt": "x", "completion": "?!"}]})
    assert bad.status_code == 422 and bad.json()["error"]["param"] == "examples.0.completion", bad.text
    good = await admin.post("/v1/adapters/api-reward/examples", json={"examples": [{"prompt": "x", "completion": "great"}]})
    assert good.status_code == 200 and good.json()["num_appended"] == 17, good.text
    assert (await admin.post(f"/v1/jobs/{long['id']}/cancel")).json()["status"] == "cancelled"


async def test_job_with_block_scales_and_sensitivity_mask_moves_only_masked_coordinates(admin, opt_model_dir):
    """Scales given inline and a mask computed by backprop at job start reach the engine: the trained adapter
    differs from version 0 in at most the mask's coordinates."""
    from safetensors.torch import load as load_tensors

    from scheduler.zo.lora_layout import LoraShape, layout_for_model_dir

    layout = layout_for_model_dir(opt_model_dir, LoraShape(4, 8.0, ("q_proj", "v_proj")))
    scales = {spec.name: 2.0 if "lora_B" in spec.name else 0.5 for spec in layout.tensors}
    direction = {"block_scales": scales, "sparse_mask": {"fraction": 0.05, "num_batches": 2, "batch_size": 4}}
    created = await admin.post("/v1/jobs", json=job_body("api-direction", 4, direction=direction))
    assert created.status_code == 201, created.text
    job = await wait_for_job(admin, created.json()["id"], lambda j: j["status"] in FINAL)
    assert job["status"] == "succeeded" and job["version"] == 4, job

    states = []
    for version in (0, 4):
        download = await admin.get(f"/v1/adapters/api-direction/versions/{version}/download")
        assert download.status_code == 200
        with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
            member = next(n for n in tar.getnames() if n.endswith("adapter_model.safetensors"))
            states.append(load_tensors(tar.extractfile(member).read()))
    changed = sum(int((states[0][k] != states[1][k]).sum()) for k in states[0])
    assert 0 < changed <= math.ceil(0.05 * layout.num_params), (changed, layout.num_params)


async def test_block_scales_file_upload_and_a_job_that_names_it(admin, opt_model_dir):
    from scheduler.zo.lora_layout import LoraShape, layout_for_model_dir

    async def upload_scales(data: bytes):
        return await admin.post("/v1/files", files={"file": ("scales.json", data, "application/json")},
                                data={"purpose": "block-scales"})

    layout = layout_for_model_dir(opt_model_dir, LoraShape(4, 8.0, ("q_proj", "v_proj")))
    scales = {spec.name: 1.0 + i for i, spec in enumerate(layout.tensors)}
    created = await upload_scales(json.dumps(scales).encode())
    assert created.status_code == 201, created.text
    meta = created.json()
    assert meta["kind"] == "block_scales" and meta["num_examples"] == len(layout.tensors)
    for bad in (b"[1, 2]", b'{"x": -1}', b'{"x": true}', b"{}", b"not json"):
        reply = await upload_scales(bad)
        assert reply.status_code == 422 and reply.json()["error"]["param"] == "file", (bad, reply.text)

    rows_file = (await _upload(admin, _jsonl(sst2_rows(8)))).json()["id"]
    wrong = (await upload_scales(json.dumps({"nope.lora_A.weight": 1.0}).encode())).json()["id"]
    cases = [
        ({"direction": {"block_scales_file": rows_file}}, "direction.block_scales_file"),
        ({"direction": {"block_scales_file": "file-000000000000000000000000"}}, "direction.block_scales_file"),
        ({"direction": {"block_scales_file": meta["id"], "block_scales": scales}}, "direction.block_scales_file"),
        ({"direction": {"block_scales_file": wrong}}, "direction.block_scales"),
        ({"training_file": meta["id"], "training_data": None}, "training_file"),
    ]
    for overrides, field in cases:
        body = {k: v for k, v in job_body("api-scales-bad", 2, **overrides).items() if v is not None}
        reply = await admin.post("/v1/jobs", json=body)
        assert reply.status_code == 422 and reply.json()["error"]["param"] == field, (overrides, reply.text)

    job = (await admin.post("/v1/jobs", json=job_body("api-scales", 2, direction={"block_scales_file": meta["id"]}))).json()
    done = await wait_for_job(admin, job["id"], lambda j: j["status"] in FINAL)
    assert done["status"] == "succeeded" and done["version"] == 2, done
