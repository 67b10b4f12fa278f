"""A job scores its next step while the last one is committed: the same job trains the same trajectory with
that on as with each commit ending before the next step's probes go in."""

from __future__ import annotations

import io
import tarfile

import pytest
import torch
from safetensors.torch import load as load_tensors

from service_harness import ADMIN_KEY, client_for, job_body, running_app, service_settings, wait_for_job

STEPS = 12


async def _state(admin, adapter: str, version: int) -> dict[str, torch.Tensor]:
    download = await admin.get(f"/v1/adapters/{adapter}/versions/{version}/download")
    with tarfile.open(fileobj=io.BytesIO(download.content), mode="r:gz") as tar:
        member = next(n for n in tar.getnames() if n.endswith("adapter_model.safetensors"))
        return load_tensors(tar.extractfile(member).read())


def _flat(state: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([state[k].flatten() for k in sorted(state)])


async def _train(admin, adapter: str) -> tuple[list[float], dict[str, torch.Tensor]]:
    body = job_body(adapter, STEPS)
    body["hyperparameters"]["learning_rate"] = 5e-2  # steps large enough to move every later loss
    job = (await admin.post("/v1/jobs", json=body)).json()
    done = await wait_for_job(admin, job["id"], lambda j: j["status"] in ("succeeded", "failed", "cancelled"))
    assert done["status"] == "succeeded" and done["version"] == STEPS, done
    steps = (await admin.get(f"/v1/jobs/{job['id']}/metrics")).json()["steps"]
    assert [s["step"] for s in steps] == list(range(1, STEPS + 1))
    return [s["loss"] for s in steps], await _state(admin, adapter, STEPS)


async def test_pipelined_and_sequential_commits_train_the_same_trajectory(engine, tmp_path):
    async with running_app(service_settings(tmp_path / "service"), engine) as (app, url):
        runtime = app.state.runtime
        assert runtime.pipelined_commits  # the default
        async with client_for(url, ADMIN_KEY) as admin:
            pipelined_losses, pipelined = await _train(admin, "commits-pipelined")
            runtime.pipelined_commits = False
            sequential_losses, sequential = await _train(admin, "commits-sequential")
            initial = await _state(admin, "commits-sequential", 0)

    # Equal up to float noise: each step's probes go into batches of other sizes in the two modes.
    assert pipelined_losses == pytest.approx(sequential_losses, rel=1e-4)
    assert pipelined.keys() == sequential.keys() == initial.keys()
    trained = (_flat(sequential) - _flat(initial)).norm()
    assert trained > 0 and (_flat(pipelined) - _flat(sequential)).norm() < 1e-2 * trained
