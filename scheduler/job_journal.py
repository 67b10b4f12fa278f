"""Jobs survive a restart: each job's spec (written once) and progress (rewritten on change) as JSON files.

The adapter store stays the source of truth for states and versions; the journal only remembers which jobs
exist, what they asked for, and where they stood, so a restarted service resumes them from their adapter's
head. Files are written to a temporary name and renamed, so a crash never leaves half a file.

Progress is saved after every step, from the service's event loop, so the journal writes it on a thread of
its own: `save_progress` only records the job's latest progress and returns; one writer thread writes each
job's latest in the order the saves came (a save made while an older one waits replaces it). On the loop, each
write (create, write, rename) held up every user request for ~1 ms, up to 6 ms while other threads fsync
(snapshot blobs, SQLite commits; measured in session 13, `results/coserve.md`), 10-17 times a second with two
jobs running. A status change (paused, cancelled, failed, ...) still waits until it is written, as before,
so that a crash right after the API answered cannot resurrect the job. `flush()` waits until every save made
before it is on disk.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

from scheduler.jobs import JobSpec, JobStatus, SparseMaskRequest
from scheduler.objectives import ClassificationObjective, CompletionObjective, LabelledText, PromptCompletion
from scheduler.rewards import RewardObjective
from scheduler.zo.lora_layout import LoraShape
from scheduler.zo.mezo import MezoHyper

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class JobProgress:
    status: JobStatus
    start_version: int  # the adapter's head when the job started stepping
    step: int
    last_loss: float | None
    error: str | None
    created_at: float


def _examples_to_json(examples) -> list[dict]:
    return [asdict(e) for e in examples]


def _examples_from_json(rows: list[dict]) -> tuple:
    return tuple(LabelledText(**r) if "label" in r else PromptCompletion(**r) for r in rows)


def _objective_to_json(objective) -> dict:
    if isinstance(objective, ClassificationObjective):
        return {"type": "classification", "template": objective.template, "options": list(objective.options)}
    if isinstance(objective, RewardObjective):
        return {"type": "reward", "template": objective.template, "match": objective.match,
                "max_new_tokens": objective.max_new_tokens, "stop": list(objective.stop)}
    return {"type": "completion"}


def _objective_from_json(raw: dict):
    if raw["type"] == "classification":
        return ClassificationObjective(raw["template"], tuple(raw["options"]))
    if raw["type"] == "reward":
        return RewardObjective(raw["template"], raw["match"], raw["max_new_tokens"], tuple(raw["stop"]))
    return CompletionObjective()


def spec_to_json(spec: JobSpec) -> dict:
    objective = spec.objective
    return {
        "adapter": spec.adapter,
        "examples": _examples_to_json(spec.examples),
        "objective": _objective_to_json(objective),
        "hyper": asdict(spec.hyper),
        "lora": {"rank": spec.lora.rank, "alpha": spec.lora.alpha, "target_modules": list(spec.lora.target_modules)},
        "batch_size": spec.batch_size,
        "max_steps": spec.max_steps,
        "seed": spec.seed,
        "weight": spec.weight,
        "method": spec.method,
        "method_params": [list(p) for p in spec.method_params],
        "eval_examples": _examples_to_json(spec.eval_examples),
        "eval_every": spec.eval_every,
        "block_scales": [list(p) for p in spec.block_scales],
        "sparse_mask": asdict(spec.sparse_mask) if spec.sparse_mask else None,
        "artifact_id": spec.artifact_id,
    }


def spec_from_json(raw: dict) -> JobSpec:
    objective = raw["objective"]
    return JobSpec(
        adapter=raw["adapter"],
        examples=_examples_from_json(raw["examples"]),
        objective=_objective_from_json(objective),
        hyper=MezoHyper(**raw["hyper"]),
        lora=LoraShape(raw["lora"]["rank"], raw["lora"]["alpha"], tuple(raw["lora"]["target_modules"])),
        batch_size=raw["batch_size"],
        max_steps=raw["max_steps"],
        seed=raw["seed"],
        weight=raw["weight"],
        method=raw["method"],
        method_params=tuple((k, float(v)) for k, v in raw["method_params"]),
        eval_examples=_examples_from_json(raw["eval_examples"]),
        eval_every=raw["eval_every"],
        block_scales=tuple((k, float(v)) for k, v in raw.get("block_scales", ())),
        sparse_mask=SparseMaskRequest(**raw["sparse_mask"]) if raw.get("sparse_mask") else None,
        artifact_id=raw.get("artifact_id"),
    )


def _write_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    with os.fdopen(fd, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, path)


class JobJournal:
    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._unwritten: dict[str, JobProgress] = {}  # job -> its latest progress not yet handed to a write
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="zoserve-journal")

    def save_spec(self, job_id: str, spec: JobSpec) -> None:
        _write_atomic(self.root / f"{job_id}.spec.json", spec_to_json(spec))

    def save_progress(self, job_id: str, progress: JobProgress, *, wait: bool = False) -> None:
        """Record `progress` as the job's latest; the writer thread puts it on disk. `wait`: return only once it
        is there (a status change the caller has to be able to rely on after a crash); otherwise never block."""
        with self._lock:
            queued = job_id in self._unwritten
            self._unwritten[job_id] = progress
        if not queued:
            self._writer.submit(self._write_progress, job_id)
        if wait:
            self.flush()

    def _write_progress(self, job_id: str) -> None:
        with self._lock:
            progress = self._unwritten.pop(job_id)
        payload = asdict(progress)
        payload["status"] = progress.status.value
        try:
            _write_atomic(self.root / f"{job_id}.progress.json", payload)
        except OSError:  # the adapter store holds the versions; a lost progress file costs a resume its step count
            log.exception("could not write the progress of job %s", job_id)

    def flush(self) -> None:
        """Wait until every progress saved before this call is written (the writer runs saves in order)."""
        self._writer.submit(lambda: None).result()

    def load_all(self) -> list[tuple[str, JobSpec, JobProgress]]:
        jobs = []
        for spec_path in sorted(self.root.glob("*.spec.json")):
            job_id = spec_path.name.removesuffix(".spec.json")
            progress_path = self.root / f"{job_id}.progress.json"
            if not progress_path.exists():
                continue
            raw = json.loads(progress_path.read_text())
            raw["status"] = JobStatus(raw["status"])
            jobs.append((job_id, spec_from_json(json.loads(spec_path.read_text())), JobProgress(**raw)))
        return jobs
