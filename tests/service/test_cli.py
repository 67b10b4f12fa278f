"""`zoserve jobs …` against the live service over REST (the CLI runs in a thread: it is a sync client and the
server shares this event loop)."""

from __future__ import annotations

import asyncio
import json

from service.cli import main
from service_harness import ROOT_KEY, sst2_rows


async def _zoserve(capsys, service_url: str, *argv: str) -> tuple[int, str]:
    code = await asyncio.to_thread(main, ["jobs", "--url", service_url, "--api-key", ROOT_KEY, *argv])
    return code, capsys.readouterr().out


async def test_jobs_commands(service_url, tmp_path, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in sst2_rows(32)))
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(json.dumps(r) + "\n" for r in sst2_rows(8)))
    code, out = await _zoserve(capsys, service_url, "create", "--adapter", "cli-sst2", "--training-file", str(data),
                               "--validation-file", str(valid), "--eval-every", "3", "--max-steps", "8",
                               "--batch-size", "4", "--lr", "1e-3", "--eps", "1e-2", "-q", "1")
    assert code == 0, out
    job_id = json.loads(out)["id"]

    code, out = await _zoserve(capsys, service_url, "pause", job_id)
    assert code == 0 and json.loads(out)["status"] == "paused"
    code, out = await _zoserve(capsys, service_url, "resume", job_id)
    assert code == 0 and json.loads(out)["status"] in ("running", "queued")

    code, out = await _zoserve(capsys, service_url, "watch", job_id, "--interval", "0.2")
    assert code == 0, out
    assert "step 8/8" in out and "steps/s" in out and "succeeded" in out

    code, out = await _zoserve(capsys, service_url, "list")
    assert code == 0 and job_id in out and "succeeded" in out
    code, out = await _zoserve(capsys, service_url, "get", job_id)
    assert json.loads(out)["step"] == 8

    png = tmp_path / "loss.png"
    code, out = await _zoserve(capsys, service_url, "plot", job_id, "-o", str(png))
    assert code == 0 and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    code, out = await _zoserve(capsys, service_url, "cancel", job_id)  # finished: the API answers 409
    assert code != 0
    code, out = await _zoserve(capsys, service_url, "get", job_id)
    assert json.loads(out)["status"] == "succeeded"


async def test_errors_are_reported_not_raised(service_url, capsys):
    code = await asyncio.to_thread(main, ["jobs", "--url", service_url, "get", "job-missing"])
    assert code == 2 and "HTTP 401" in capsys.readouterr().err
    code = await asyncio.to_thread(main, ["jobs", "--url", service_url, "--api-key", ROOT_KEY, "get", "job-missing"])
    assert code == 2 and "HTTP 404" in capsys.readouterr().err
