"""Uploaded block-scales files: parsed at upload, listed beside training files, never mistaken for them."""

from __future__ import annotations

import json

import pytest

from service.errors import InvalidInput
from service.files.store import FileStore


def test_scales_and_rows_are_two_kinds_of_file(tmp_path):
    files = FileStore(tmp_path)
    scales = files.save(json.dumps({"a.lora_A.weight": 1, "a.lora_B.weight": 2.5}).encode(), "s.json", "block-scales")
    rows = files.save(b'{"text": "x", "label": 0}\n', "r.jsonl", "fine-tune")
    assert (scales.kind, scales.num_examples) == ("block_scales", 2)
    assert sorted(m.id for m in files.list()) == sorted([scales.id, rows.id])
    assert files.block_scales(scales.id) == {"a.lora_A.weight": 1.0, "a.lora_B.weight": 2.5}
    assert len(files.examples(rows.id)) == 1
    with pytest.raises(InvalidInput) as exc:
        files.examples(scales.id, "training_file")
    assert exc.value.field == "training_file"
    with pytest.raises(InvalidInput):
        files.block_scales(rows.id, "direction.block_scales_file")


@pytest.mark.parametrize("data", [b"[1]", b"{}", b'{"x": -1}', b'{"x": "1"}', b'{"x": NaN}', b"\xff"])
def test_bad_scales_are_rejected_at_upload(tmp_path, data):
    with pytest.raises(InvalidInput):
        FileStore(tmp_path).save(data, "s.json", "block-scales")
    assert FileStore(tmp_path).list() == []
