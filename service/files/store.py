"""Uploaded training files, kept under the service's own data dir and addressed by a server-made id.

Ids are `file-<24 hex>` and checked against that pattern before any path is built, so no request can point
the service at a path of its choosing. A file is parsed and validated once, at upload.

Two kinds of file: JSONL training rows (any purpose but `block-scales`), and per-block perturbation scales
(purpose `block-scales`: one JSON object {PEFT tensor name: scale ≥ 0}), which a job names in
`direction.block_scales_file`.
"""

from __future__ import annotations

import json
import math
import re
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Literal
from pathlib import Path

from service.errors import InvalidInput, NotFound
from service.examples import ExampleIn, ExampleKind, kind_of, parse_jsonl

_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")
BLOCK_SCALES_PURPOSE = "block-scales"
MAX_SCALES = 100_000


@dataclass(frozen=True)
class FileMeta:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    num_examples: int  # rows, or tensors with a scale
    kind: ExampleKind | Literal["block_scales"]


class FileStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, data: bytes, filename: str, purpose: str) -> FileMeta:
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        if purpose == BLOCK_SCALES_PURPOSE:
            scales = parse_block_scales(data)
            meta = FileMeta(file_id, filename, purpose, len(data), time.time(), len(scales), "block_scales")
            suffix = ".scales"  # not *.json: list() globs metadata as file-*.json
        else:
            rows = parse_jsonl(data)
            meta = FileMeta(file_id, filename, purpose, len(data), time.time(), len(rows), kind_of(rows[0]))
            suffix = ".jsonl"
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{meta.id}{suffix}").write_bytes(data)
        # Metadata last: a file without its .json is invisible, so a crash mid-save leaves no half file.
        (self.directory / f"{meta.id}.json").write_text(json.dumps(asdict(meta)))
        return meta

    def meta(self, file_id: str, field: str = "file_id") -> FileMeta:
        path = self._path(file_id, ".json", field)
        return FileMeta(**json.loads(path.read_text()))

    def examples(self, file_id: str, field: str = "file_id") -> list[ExampleIn]:
        if self.meta(file_id, field).kind == "block_scales":
            raise InvalidInput(f"{field}: file {file_id} holds block scales, not training rows", field)
        return parse_jsonl(self._path(file_id, ".jsonl", field).read_bytes(), field)

    def block_scales(self, file_id: str, field: str = "file_id") -> dict[str, float]:
        if self.meta(file_id, field).kind != "block_scales":
            raise InvalidInput(f"{field}: file {file_id} holds training rows, not block scales", field)
        return parse_block_scales(self._path(file_id, ".scales", field).read_bytes(), field)

    def list(self) -> list[FileMeta]:
        if not self.directory.is_dir():
            return []
        metas = [FileMeta(**json.loads(p.read_text())) for p in self.directory.glob("file-*.json")]
        return sorted(metas, key=lambda m: m.created_at)

    def _path(self, file_id: str, suffix: str, field: str) -> Path:
        if not _ID_RE.match(file_id):
            raise NotFound(f"file {file_id!r} does not exist", field)
        path = self.directory / f"{file_id}{suffix}"
        if not path.is_file():
            raise NotFound(f"file {file_id!r} does not exist", field)
        return path


def parse_block_scales(data: bytes, field: str = "file") -> dict[str, float]:
    """A JSON object {tensor name: finite number ≥ 0}; whether the names fit the adapter is checked per job."""
    try:
        obj = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"{field}: block scales must be one JSON object ({exc})", field) from None
    if not isinstance(obj, dict) or not obj or len(obj) > MAX_SCALES:
        raise InvalidInput(f"{field}: block scales must be a non-empty JSON object {{tensor name: scale}}", field)
    for name, value in obj.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise InvalidInput(f"{field}: scale of {name!r} is {value!r}, not a finite number >= 0", field)
    return {name: float(value) for name, value in obj.items()}
