"""Control plane: fine-tuning jobs. Thin routes: translate HTTP to one runtime call."""

from __future__ import annotations

from dataclasses import asdict

from fastapi import APIRouter, Request

from scheduler.jobs import JobSpec, JobView
from scheduler.objectives import ClassificationObjective, LabelledText
from scheduler.runtime import Runtime
from scheduler.zo.lora_layout import LoraShape
from scheduler.zo.mezo import MezoHyper
from service.schemas import JobCreate, JobOut

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


def to_out(view: JobView) -> JobOut:
    return JobOut(**{**asdict(view), "status": view.status.value})


def to_spec(body: JobCreate) -> JobSpec:
    hp = body.hyperparameters
    return JobSpec(
        adapter=body.adapter,
        examples=tuple(LabelledText(e.text, e.label) for e in body.training_data),
        objective=ClassificationObjective(body.objective.template, tuple(body.objective.options)),
        hyper=MezoHyper(lr=hp.learning_rate, eps=hp.eps, num_directions=hp.num_directions, weight_decay=hp.weight_decay),
        lora=LoraShape(body.lora.rank, body.lora.alpha, tuple(sorted(body.lora.target_modules))),
        batch_size=hp.batch_size,
        max_steps=hp.max_steps,
        seed=body.seed,
    )


@router.post("", status_code=201, response_model=JobOut)
async def create_job(body: JobCreate, request: Request) -> JobOut:
    return to_out(await _runtime(request).create_job(to_spec(body)))


@router.get("", response_model=list[JobOut])
async def list_jobs(request: Request) -> list[JobOut]:
    return [to_out(v) for v in _runtime(request).jobs()]


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, request: Request) -> JobOut:
    return to_out(_runtime(request).job(job_id))
