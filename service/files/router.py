"""`POST /v1/files` (JSONL training data, multipart like OpenAI's files API), `GET /v1/files[/{id}]`."""

from __future__ import annotations

import asyncio
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from pydantic import BaseModel

from service.auth import require_admin
from service.errors import PayloadTooLarge
from service.files.store import FileMeta, FileStore

router = APIRouter(prefix="/v1/files", tags=["files"], dependencies=[Depends(require_admin)])

_CHUNK_BYTES = 1 << 20


class FileOut(BaseModel):
    id: str
    object: Literal["file"] = "file"
    filename: str
    purpose: str
    bytes: int
    created_at: int
    num_examples: int
    kind: str


class FileList(BaseModel):
    object: Literal["list"] = "list"
    data: list[FileOut]


async def file_store(request: Request) -> FileStore:
    return request.app.state.files


Files = Annotated[FileStore, Depends(file_store)]


def to_out(meta: FileMeta) -> FileOut:
    return FileOut(**{**meta.__dict__, "created_at": int(meta.created_at)})


async def _read_limited(upload: UploadFile, max_bytes: int) -> bytes:
    # Read in chunks and stop one byte past the limit: never buffer an oversized upload whole.
    chunks, size = [], 0
    while chunk := await upload.read(_CHUNK_BYTES):
        size += len(chunk)
        if size > max_bytes:
            raise PayloadTooLarge(f"file: larger than the limit of {max_bytes} bytes", "file")
        chunks.append(chunk)
    return b"".join(chunks)


@router.post("", status_code=201, response_model=FileOut)
async def upload_file(
    request: Request, files: Files, file: UploadFile = File(...), purpose: str = Form("fine-tune")
) -> FileOut:
    max_bytes = request.app.state.settings.max_upload_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > max_bytes + 64 * 1024:
        # Multipart overhead is small; a declared body this large cannot hold a file under the limit.
        raise PayloadTooLarge(f"file: larger than the limit of {max_bytes} bytes", "file")
    data = await _read_limited(file, max_bytes)
    meta = await asyncio.to_thread(files.save, data, file.filename or "upload.jsonl", purpose)
    return to_out(meta)


@router.get("", response_model=FileList)
async def list_files(files: Files) -> FileList:
    return FileList(data=[to_out(m) for m in await asyncio.to_thread(files.list)])


@router.get("/{file_id}", response_model=FileOut)
async def get_file(file_id: str, files: Files) -> FileOut:
    return to_out(files.meta(file_id))
