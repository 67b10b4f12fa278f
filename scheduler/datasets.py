"""Task data read from the shared data folder (never downloaded)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

from scheduler.objectives import LabelledText


def shared_data_dir() -> Path:
    default = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
    return Path(os.environ.get("ZOSERVE_TASK_DATA_DIR", default)).resolve()


def load_sst2(split: str = "train", limit: int | None = None, data_dir: Path | None = None) -> list[LabelledText]:
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', not {split!r}")
    path = (data_dir or shared_data_dir()) / "sst2" / f"{split}.tsv"
    examples: list[LabelledText] = []
    with path.open(newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        next(rows)
        for row in rows:
            if limit is not None and len(examples) >= limit:
                break
            examples.append(LabelledText(row[0].strip(), int(row[1])))
    return examples
