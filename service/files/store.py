"""Uploaded training files, kept under the service's own data dir and addressed by a server-made id.

Ids are `file-<24 hex>` and checked against that pattern before any path is built, so no request can point
the service at a path of its choosing. A file is parsed and validated once, at upload.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from dataclasses import asdict, dataclass
from pathlib import Path

from service.errors import NotFound
from service.examples import ExampleIn, ExampleKind, kind_of, parse_jsonl

_ID_RE = re.compile(r"^file-[0-9a-f]{24}$")


@dataclass(frozen=True)
class FileMeta:
    id: str
    filename: str
    purpose: str
    bytes: int
    created_at: float
    num_examples: int
    kind: ExampleKind


class FileStore:
    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)

    def save(self, data: bytes, filename: str, purpose: str) -> FileMeta:
        rows = parse_jsonl(data)
        meta = FileMeta(f"file-{uuid.uuid4().hex[:24]}", filename, purpose, len(data), time.time(), len(rows),
                        kind_of(rows[0]))
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / f"{meta.id}.jsonl").write_bytes(data)
        # Metadata last: a file without its .json is invisible, so a crash mid-save leaves no half file.
        (self.directory / f"{meta.id}.json").write_text(json.dumps(asdict(meta)))
        return meta

    def meta(self, file_id: str, field: str = "file_id") -> FileMeta:
        path = self._path(file_id, ".json", field)
        return FileMeta(**json.loads(path.read_text()))

    def examples(self, file_id: str, field: str = "file_id") -> list[ExampleIn]:
        self.meta(file_id, field)
        return parse_jsonl(self._path(file_id, ".jsonl", field).read_bytes(), field)

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
