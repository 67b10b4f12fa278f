"""Control plane: adapters, their versions, rollback, PEFT download, and examples for a running job."""

from __future__ import annotations

import asyncio
import shutil
import tarfile
import uuid
from dataclasses import asdict
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import FileResponse
from starlette.background import BackgroundTask

from adapters_store import InvalidArgument
from scheduler.jobs import AdapterView
from service.adapters.schemas import (
    AdapterList,
    AdapterOut,
    ExamplesAppended,
    ExamplesIn,
    RollbackIn,
    VersionList,
    VersionOut,
)
from service.auth import require_admin
from service.errors import InvalidInput
from service.examples import kind_of, to_records
from service.jobs.router import RuntimeDep

router = APIRouter(prefix="/v1/adapters", tags=["adapters"], dependencies=[Depends(require_admin)])


def to_out(view: AdapterView) -> AdapterOut:
    return AdapterOut(**{**asdict(view), "target_modules": list(view.target_modules)})


@router.get("", response_model=AdapterList)
async def list_adapters(runtime: RuntimeDep) -> AdapterList:
    return AdapterList(data=[to_out(v) for v in await runtime.adapters()])


@router.get("/{name}", response_model=AdapterOut)
async def get_adapter(name: str, runtime: RuntimeDep) -> AdapterOut:
    return to_out(await runtime.adapter(name))


@router.get("/{name}/versions", response_model=VersionList)
async def list_versions(
    name: str,
    runtime: RuntimeDep,
    offset: Annotated[int, Query(ge=0)] = 0,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> VersionList:
    views = await runtime.adapter_versions(name, offset=offset, limit=limit + 1)
    return VersionList(
        data=[VersionOut(**asdict(v)) for v in views[:limit]], offset=offset, limit=limit, has_more=len(views) > limit
    )


@router.post("/{name}/rollback", response_model=AdapterOut)
async def rollback(name: str, body: RollbackIn, runtime: RuntimeDep) -> AdapterOut:
    try:
        return to_out(await runtime.rollback(name, body.version))
    except InvalidArgument as exc:  # the store calls it to_version; the caller sent `version`
        raise InvalidInput(str(exc), "version" if exc.field == "to_version" else exc.field) from None


def _tar_gz(source: Path, archive: Path, top: str) -> None:
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(source, arcname=top)


@router.get("/{name}/versions/{version}/download", response_class=FileResponse)
async def download_version(name: str, version: int, runtime: RuntimeDep, request: Request) -> FileResponse:
    """The version as a PEFT directory (adapter_config.json + adapter_model.safetensors) in a tar.gz."""
    # The export directory is ours (under the data dir, random name); nothing from the request names a path.
    work = request.app.state.settings.exports_dir / uuid.uuid4().hex
    work.mkdir(parents=True)
    try:
        peft_dir = await runtime.export_adapter(name, version, work / "peft")
        archive = work / "adapter.tar.gz"
        top = f"{name}-v{version}"
        await asyncio.to_thread(_tar_gz, peft_dir, archive, top)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return FileResponse(
        archive,
        media_type="application/gzip",
        filename=f"{top}.tar.gz",
        background=BackgroundTask(shutil.rmtree, work, True),
    )


@router.post("/{name}/examples", response_model=ExamplesAppended)
async def append_examples(name: str, body: ExamplesIn, runtime: RuntimeDep) -> ExamplesAppended:
    """Append labelled examples to the stream the adapter's running job samples from."""
    records = to_records(body.examples, kind_of(body.examples[0]), "examples")
    return ExamplesAppended(adapter=name, num_appended=await runtime.append_examples(name, records))
