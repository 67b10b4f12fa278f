"""Direction artifacts: one blob for scales and masks, named by version records, rebuilt exactly by replay."""

from __future__ import annotations

import pytest
import torch
from zo_problems import small_layout, start_theta

from adapters_store import VersionRecord
from scheduler.direction_artifacts import (
    MissingArtifact,
    artifact_hparam,
    artifact_id,
    decode_artifacts,
    encode_artifacts,
    method_from_wire,
    split_hparams,
)
from scheduler.replay import applier_for, record_hparams
from scheduler.zo.block_scales import normalise_scales
from scheduler.zo.methods import build_method, hyper_items, parse_hyper
from scheduler.zo.sparse_mask import topk_mask
from scheduler.zo.zo_step import StepRecord, TrainState, apply_record, finish_step, next_probes

LAYOUT = small_layout()


def _artifacts():
    gen = torch.Generator().manual_seed(0)
    mask = topk_mask({s.name: torch.rand(s.shape, generator=gen) for s in LAYOUT.tensors}, LAYOUT, 0.3)
    scales = normalise_scales({s.name: 0.5 + i for i, s in enumerate(LAYOUT.tensors)}, LAYOUT)
    return scales, mask


def test_round_trip_is_exact_and_content_addressed():
    scales, mask = _artifacts()
    blob = encode_artifacts(LAYOUT, scales, mask)
    assert encode_artifacts(LAYOUT, scales, mask) == blob and len(artifact_id(blob)) == 64
    back = decode_artifacts(blob, LAYOUT)
    assert back.block_scales == scales  # float64 on the wire: bit-exact
    assert all(torch.equal(back.mask[k], mask[k]) for k in mask)
    only_mask = decode_artifacts(encode_artifacts(LAYOUT, mask=mask), LAYOUT)
    assert only_mask.block_scales is None and only_mask.mask is not None
    assert artifact_id(encode_artifacts(LAYOUT, mask=mask)) != artifact_id(blob)


def test_bad_artifacts_name_the_offender():
    scales, mask = _artifacts()
    with pytest.raises(ValueError, match="artifacts"):
        encode_artifacts(LAYOUT)
    with pytest.raises(ValueError, match=r"block_scales\["):
        encode_artifacts(LAYOUT, {**scales, "extra": 1.0})
    with pytest.raises(ValueError, match=r"mask\["):
        encode_artifacts(LAYOUT, mask={k: v for k, v in list(mask.items())[1:]})


def test_hparams_name_the_artifact():
    items = (("momentum", 0.9), artifact_hparam("ab" * 32))
    assert split_hparams(items) == ((("momentum", 0.9),), "ab" * 32)
    assert split_hparams((("momentum", 0.9),)) == ((("momentum", 0.9),), None)


def test_worker_wire_and_replay_build_the_same_method_as_the_job():
    scales, mask = _artifacts()
    blob = encode_artifacts(LAYOUT, scales, mask)
    hyper = parse_hyper("zo-sgd-mmt", {"lr": 1e-2, "eps": 1e-3, "momentum": 0.5})
    job_method = build_method("zo-sgd-mmt", hyper, block_scales=scales, mask=mask)
    wire_method = method_from_wire(("zo-sgd-mmt", hyper_items(hyper), blob), LAYOUT)
    theta = start_theta(LAYOUT)
    job_state = TrainState({k: v.clone() for k, v in theta.items()}, job_method.optimiser.init_buffers(LAYOUT))
    wire_state = TrainState({k: v.clone() for k, v in theta.items()}, wire_method.optimiser.init_buffers(LAYOUT))
    replay_theta, replay_buffers = {k: v.clone() for k, v in theta.items()}, {}
    apply = applier_for(LAYOUT, {artifact_id(blob): blob})
    for step in range(3):
        seeds = job_method.perturbation.seeds_for_step(4, step, 1)
        assert next_probes(job_method, seeds, (), hyper.lr) is not None
        record = finish_step(job_method, seeds, (0.7 + step, 0.2), hyper.lr)
        apply_record(job_method, job_state, LAYOUT, record)
        apply_record(wire_method, wire_state, LAYOUT, StepRecord(seeds, (), record.coeffs, record.lr))
        apply(replay_theta, replay_buffers, VersionRecord(
            version=step + 1, parent=step, step=step, optimizer="zo-sgd-mmt", seeds=seeds.as_tuple(),
            coeffs=record.coeffs, lr=record.lr, eps=hyper.eps,
            hparams=record_hparams(hyper) + (artifact_hparam(artifact_id(blob)),),
        ))
    for k in theta:
        assert torch.equal(job_state.theta[k], wire_state.theta[k]) and torch.equal(job_state.theta[k], replay_theta[k])
        assert torch.equal(theta[k][~mask[k]], replay_theta[k][~mask[k]])  # outside the mask nothing moves
    assert any(not torch.equal(theta[k], replay_theta[k]) for k in theta)
    with pytest.raises(MissingArtifact) as missing:
        applier_for(LAYOUT)(dict(theta), {}, VersionRecord(
            version=1, parent=0, step=0, optimizer="zo-sgd-mmt", seeds=(1,), coeffs=(0.1,), lr=0.1, eps=1e-3,
            hparams=record_hparams(hyper) + (artifact_hparam(artifact_id(blob)),),
        ))
    assert missing.value.artifact_id == artifact_id(blob)
