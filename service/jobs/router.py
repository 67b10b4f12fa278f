"""Control plane: fine-tuning jobs. Thin routes: translate HTTP to one runtime call."""

from __future__ import annotations

import asyncio
from dataclasses import asdict
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request

from scheduler.jobs import JobSpec, JobView, SparseMaskRequest
from scheduler.objectives import ClassificationObjective, CompletionObjective
from scheduler.rewards import InvalidRewardObjective, RewardObjective
from scheduler.runtime import Runtime
from scheduler.zo.lora_layout import LoraShape
from scheduler.zo.mezo import MezoHyper
from service.auth import require_admin
from service.errors import InvalidInput, NotFound
from service.examples import ExampleIn, to_records
from service.files.store import FileStore
from service.jobs.inline_examples import with_checked_examples
from service.jobs.schemas import (
    ClassificationObjectiveIn,
    DirectionIn,
    EvalMetricOut,
    JobCreate,
    JobEventList,
    JobEventOut,
    JobList,
    JobMetrics,
    JobOut,
    RewardObjectiveIn,
    StepMetricOut,
)

router = APIRouter(prefix="/v1/jobs", tags=["jobs"], dependencies=[Depends(require_admin)])


async def get_runtime(request: Request) -> Runtime:
    return request.app.state.runtime


RuntimeDep = Annotated[Runtime, Depends(get_runtime)]


def to_out(view: JobView) -> JobOut:
    return JobOut(**{**asdict(view), "status": view.status.value})


def _dataset(inline: list[ExampleIn] | None, file_id: str | None, files: FileStore, field: str) -> list[ExampleIn] | None:
    if inline is not None and file_id is not None:
        raise InvalidInput(f"give {field}_data or {field}_file, not both", f"{field}_file")
    if file_id is not None:
        try:
            return files.examples(file_id, f"{field}_file")
        except NotFound as exc:  # a body field naming nothing is bad input, not a missing URL resource
            raise InvalidInput(str(exc), f"{field}_file") from None
    return inline


def to_spec(body: JobCreate, files: FileStore) -> JobSpec:
    """The runtime's JobSpec; reading a named upload is the only I/O."""
    objective = body.objective
    if isinstance(objective, ClassificationObjectiveIn):
        if "{text}" not in objective.template:
            raise InvalidInput("objective.template: must contain {text}", "objective.template")
        kind, runtime_objective = "classification", ClassificationObjective(objective.template, tuple(objective.options))
    elif isinstance(objective, RewardObjectiveIn):
        try:
            runtime_objective = RewardObjective(
                objective.template, objective.match, objective.max_new_tokens, tuple(objective.stop)
            )
        except InvalidRewardObjective as exc:
            raise InvalidInput(f"objective.{exc}", f"objective.{exc.field}") from None
        kind = "completion"  # rows {prompt, completion}: the completion is the reference answer
    else:
        kind, runtime_objective = "completion", CompletionObjective()
    training = _dataset(body.training_data, body.training_file, files, "training")
    if training is None:
        raise InvalidInput("training_data or training_file is required", "training_data")
    validation = _dataset(body.validation_data, body.validation_file, files, "validation") or []
    train_field = "training_file" if body.training_file else "training_data"
    eval_field = "validation_file" if body.validation_file else "validation_data"
    hp = body.hyperparameters
    return JobSpec(
        adapter=body.adapter,
        examples=to_records(training, kind, train_field),
        objective=runtime_objective,
        hyper=MezoHyper(lr=hp.learning_rate, eps=hp.eps, num_directions=hp.num_directions, weight_decay=hp.weight_decay),
        lora=LoraShape(body.lora.rank, body.lora.alpha, tuple(sorted(body.lora.target_modules))),
        batch_size=hp.batch_size,
        max_steps=hp.max_steps,
        seed=body.seed,
        weight=body.weight,
        method=body.method,
        method_params=tuple(sorted(body.method_params.items())),
        eval_examples=to_records(validation, kind, eval_field),
        eval_every=body.eval_every,
        **_direction(body.direction, files),
    )


def _direction(direction: DirectionIn | None, files: FileStore) -> dict:
    if direction is None:
        return {}
    scales = direction.block_scales
    if direction.block_scales_file is not None:
        if scales is not None:
            raise InvalidInput("give direction.block_scales or direction.block_scales_file, not both", "direction.block_scales_file")
        try:
            scales = files.block_scales(direction.block_scales_file, "direction.block_scales_file")
        except NotFound as exc:  # a body field naming nothing is bad input
            raise InvalidInput(str(exc), "direction.block_scales_file") from None
    mask = direction.sparse_mask
    return {
        "block_scales": tuple(sorted((scales or {}).items())),
        "sparse_mask": SparseMaskRequest(mask.fraction, mask.num_batches, mask.batch_size) if mask else None,
    }


@router.post("", status_code=201, response_model=JobOut)
async def create_job(body: JobCreate, runtime: RuntimeDep, request: Request) -> JobOut:
    body = await with_checked_examples(body)
    spec = await asyncio.to_thread(to_spec, body, request.app.state.files)
    return to_out(await runtime.create_job(spec))


@router.get("", response_model=JobList)
async def list_jobs(
    runtime: RuntimeDep, offset: Annotated[int, Query(ge=0)] = 0, limit: Annotated[int, Query(ge=1, le=1000)] = 100
) -> JobList:
    views = runtime.jobs(offset=offset, limit=limit + 1)  # one more tells whether a next page exists
    return JobList(data=[to_out(v) for v in views[:limit]], offset=offset, limit=limit, has_more=len(views) > limit)


@router.get("/{job_id}", response_model=JobOut)
async def get_job(job_id: str, runtime: RuntimeDep) -> JobOut:
    return to_out(runtime.job(job_id))


@router.post("/{job_id}/cancel", response_model=JobOut)
async def cancel_job(job_id: str, runtime: RuntimeDep) -> JobOut:
    return to_out(await runtime.cancel(job_id))


@router.post("/{job_id}/pause", response_model=JobOut)
async def pause_job(job_id: str, runtime: RuntimeDep) -> JobOut:
    return to_out(runtime.pause(job_id))


@router.post("/{job_id}/resume", response_model=JobOut)
async def resume_job(job_id: str, runtime: RuntimeDep) -> JobOut:
    return to_out(runtime.resume(job_id))


@router.get("/{job_id}/events", response_model=JobEventList)
async def job_events(job_id: str, runtime: RuntimeDep, after: Annotated[int, Query(ge=0)] = 0) -> JobEventList:
    events = runtime.job_events(job_id, after_seq=after)
    return JobEventList(data=[JobEventOut(**{**asdict(e), "status": e.status.value}) for e in events])


@router.get("/{job_id}/metrics", response_model=JobMetrics)
async def job_metrics(
    job_id: str,
    runtime: RuntimeDep,
    after_step: Annotated[int, Query(ge=0, description="only steps (and evaluations) after this step number")] = 0,
    limit: Annotated[int, Query(ge=1, le=10_000, description="at most this many steps")] = 1000,
) -> JobMetrics:
    # Paged: a long job keeps up to 100,000 step records, and building them all in one reply would stop the
    # event loop for over a second.
    page = runtime.job_metrics(job_id, after_step, limit)
    view = runtime.job(job_id)
    return JobMetrics(
        job_id=job_id,
        # vars(), not asdict(): the records are flat, and asdict's deep copy was most of the cost.
        steps=[StepMetricOut(**vars(m), steps_per_s=1.0 / m.duration_s if m.duration_s > 0 else None) for m in page.steps],
        evals=[EvalMetricOut(**vars(e)) for e in page.evals],
        steps_per_s=view.steps_per_s,
        has_more=page.has_more,
    )
