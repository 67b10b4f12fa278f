"""A job's direction artifacts at the spec level: validation names the field, the journal keeps them."""

from __future__ import annotations

import pytest

from scheduler.errors import InvalidJobSpec
from scheduler.job_artifacts import has_artifacts, validate_artifacts
from scheduler.job_journal import spec_from_json, spec_to_json
from scheduler.jobs import JobSpec, SparseMaskRequest
from scheduler.objectives import ClassificationObjective, LabelledText
from scheduler.zo.lora_layout import LoraLayout, LoraShape, TensorSpec
from scheduler.zo.methods import parse_hyper

LAYOUT = LoraLayout(
    LoraShape(2, 4.0, ("q_proj",)),
    (TensorSpec("m.lora_A.weight", (2, 3), "m", "A"), TensorSpec("m.lora_B.weight", (3, 2), "m", "B")),
)
SCALES = (("m.lora_A.weight", 1.0), ("m.lora_B.weight", 2.0))


def _spec(**kw) -> JobSpec:
    return JobSpec("a", (LabelledText("x y", 0),), ClassificationObjective(), **kw)


def test_journal_round_trip_keeps_scales_mask_request_and_artifact_id():
    spec = _spec(block_scales=SCALES, sparse_mask=SparseMaskRequest(0.1, 2, 4), artifact_id="ab" * 32)
    assert spec_from_json(spec_to_json(spec)) == spec
    plain = spec_to_json(_spec())
    for key in ("block_scales", "sparse_mask", "artifact_id"):  # journals written before these fields
        plain.pop(key)
    assert spec_from_json(plain) == _spec() and not has_artifacts(_spec())


@pytest.mark.parametrize(
    "kw, method, params, field",
    [
        ({"block_scales": SCALES[:1]}, "mezo-sgd", {}, "direction.block_scales"),
        ({"block_scales": (("m.lora_A.weight", -1.0), SCALES[1])}, "mezo-sgd", {}, "direction.block_scales"),
        ({"sparse_mask": SparseMaskRequest(0.0)}, "mezo-sgd", {}, "direction.sparse_mask.fraction"),
        ({"sparse_mask": SparseMaskRequest(0.5, 0)}, "mezo-sgd", {}, "direction.sparse_mask.num_batches"),
        ({"sparse_mask": SparseMaskRequest(0.5)}, "lozo", {}, "direction.sparse_mask"),
        ({"block_scales": SCALES}, "kerzoo", {}, "direction.block_scales"),
        ({"sparse_mask": SparseMaskRequest(0.5)}, "mezo-sgd", {"weight_decay": 0.1}, "hyperparameters.weight_decay"),
    ],
)
def test_bad_artifacts_name_the_field(kw, method, params, field):
    spec = _spec(method=method, **kw)
    with pytest.raises(InvalidJobSpec) as exc:
        validate_artifacts(spec, parse_hyper(method, {"lr": 1e-3, "eps": 1e-3, **params}), LAYOUT)
    assert exc.value.field == field


def test_good_artifacts_pass():
    spec = _spec(block_scales=SCALES, sparse_mask=SparseMaskRequest(0.5), method="zo-adam")
    validate_artifacts(spec, parse_hyper("zo-adam", {"lr": 1e-3}), LAYOUT)
