"""Per-block scales (loading, validation, norm preservation) and sparse masks (top-k, perturb only the mask)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from zo_problems import small_layout, start_theta

from scheduler.zo.block_scales import load_block_scales, normalise_scales
from scheduler.zo.gaussian import GaussianPerturbation
from scheduler.zo.methods import build_method, parse_hyper
from scheduler.zo.sparse_mask import sensitivity_scores, topk_mask, validate_mask
from scheduler.zo.zo_step import materialise_probes, next_probes

LAYOUT = small_layout()
NAMES = [s.name for s in LAYOUT.tensors]


def _raw():
    return {name: 0.5 + i for i, name in enumerate(NAMES)}


def test_normalised_scales_preserve_the_perturbation_norm():
    scales = normalise_scales(_raw(), LAYOUT)
    energy = sum(spec.numel * scales[spec.name] ** 2 for spec in LAYOUT.tensors)
    assert abs(energy - LAYOUT.num_params) < 1e-9
    ratios = [scales[n] / raw for n, raw in _raw().items()]
    assert max(ratios) - min(ratios) < 1e-12  # only a common factor
    # and the directions: E‖s⊙z‖² = E‖z‖² = N, checked by Monte-Carlo over 2000 seeds (5 standard errors)
    perturbation = GaussianPerturbation(block_scales=scales)
    norms = []
    for seed in range(2000):
        seeds = perturbation.seeds_for_step(seed, 0, 1)
        norms.append(sum(float((ds[0] ** 2).sum()) for _, ds in perturbation.stream(LAYOUT, seeds)))
    norms_t = torch.tensor(norms, dtype=torch.float64)
    assert abs(float(norms_t.mean()) - LAYOUT.num_params) < 5 * float(norms_t.std()) / len(norms) ** 0.5


def test_scaled_directions_are_mezo_z_times_the_scale():
    scales = normalise_scales(_raw(), LAYOUT)
    plain, scaled = GaussianPerturbation(), GaussianPerturbation(block_scales=scales)
    seeds = plain.seeds_for_step(3, 0, 2)
    for (spec, zs), (_, ds) in zip(plain.stream(LAYOUT, seeds), scaled.stream(LAYOUT, seeds)):
        assert all(torch.equal(d, z * scales[spec.name]) for z, d in zip(zs, ds))


def test_load_json_and_safetensors(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps(_raw()))
    save_file({n: torch.tensor([v]) for n, v in _raw().items()}, str(tmp_path / "s.safetensors"))
    from_json = load_block_scales(tmp_path / "s.json", LAYOUT)
    from_st = load_block_scales(tmp_path / "s.safetensors", LAYOUT)
    assert from_json.keys() == from_st.keys() == set(NAMES)
    assert all(abs(from_json[n] - from_st[n]) < 1e-6 for n in NAMES)


@pytest.mark.parametrize(
    "raw, key",
    [
        ({**_raw(), "base_model.model.nope.lora_A.weight": 1.0}, "base_model.model.nope.lora_A.weight"),
        ({k: v for k, v in _raw().items() if k != NAMES[0]}, NAMES[0]),
        ({**_raw(), NAMES[1]: -1.0}, NAMES[1]),
        ({**_raw(), NAMES[2]: float("nan")}, NAMES[2]),
    ],
)
def test_bad_scales_name_the_key(raw, key):
    with pytest.raises(ValueError, match="block_scales") as info:
        normalise_scales(raw, LAYOUT)
    assert repr(key) in str(info.value)


def test_all_zero_scales_rejected(tmp_path):
    with pytest.raises(ValueError):
        normalise_scales({n: 0.0 for n in NAMES}, LAYOUT)
    (tmp_path / "s.txt").write_text("{}")
    with pytest.raises(ValueError):
        load_block_scales(tmp_path / "s.txt", LAYOUT)


# --------------------------------------------------------------------------------------------- sparse masks
def test_topk_mask_keeps_the_top_fraction_globally():
    scores = {s.name: torch.arange(s.numel, dtype=torch.float32).reshape(s.shape) + 100 * i
              for i, s in enumerate(LAYOUT.tensors)}
    mask = topk_mask(scores, LAYOUT, 0.25)
    kept = torch.cat([scores[n][mask[n]] for n in NAMES])
    dropped = torch.cat([scores[n][~mask[n]] for n in NAMES])
    assert kept.numel() == 9 == -(-LAYOUT.num_params // 4)
    assert float(kept.min()) >= float(dropped.max())


def test_topk_ties_break_by_layout_position():
    scores = {s.name: torch.ones(s.shape) for s in LAYOUT.tensors}
    mask = topk_mask(scores, LAYOUT, 0.1)
    first = LAYOUT.tensors[0]
    assert int(mask[first.name].sum()) == 4 and bool(mask[first.name].reshape(-1)[:4].all())


def test_sensitivity_scores_sum_squared_gradients():
    grads = [{s.name: torch.full(s.shape, float(b + 1)) for s in LAYOUT.tensors} for b in range(3)]
    scores = sensitivity_scores(LAYOUT, lambda b: grads[b], 3)
    assert all(torch.equal(scores[n], torch.full(scores[n].shape, 1.0 + 4.0 + 9.0)) for n in NAMES)
    with pytest.raises(ValueError, match="num_batches"):
        sensitivity_scores(LAYOUT, lambda b: grads[b], 0)


def test_masked_probes_touch_only_masked_coordinates():
    g = torch.Generator().manual_seed(1)
    mask = topk_mask({s.name: torch.rand(s.shape, generator=g) for s in LAYOUT.tensors}, LAYOUT, 0.3)
    method = build_method("zo-sgd-cons", parse_hyper("zo-sgd-cons", {"num_directions": 3}), mask=mask)
    theta = start_theta(LAYOUT)
    seeds = method.perturbation.seeds_for_step(0, 0, 3)
    probes = next_probes(method, seeds, (), 0.1)
    for state in materialise_probes(theta, LAYOUT, method.perturbation, seeds, probes)[1:]:
        for n in NAMES:
            assert torch.equal(state[n][~mask[n]], theta[n][~mask[n]])
            assert not torch.equal(state[n][mask[n]], theta[n][mask[n]])


def test_mask_validation():
    with pytest.raises(ValueError, match="fraction"):
        topk_mask({s.name: torch.ones(s.shape) for s in LAYOUT.tensors}, LAYOUT, 0.0)
    with pytest.raises(ValueError, match="mask"):
        validate_mask({s.name: torch.zeros(s.shape) for s in LAYOUT.tensors}, LAYOUT)
    with pytest.raises(ValueError, match=NAMES[0].replace(".", r"\.")):
        validate_mask({}, LAYOUT)
    out = validate_mask({s.name: torch.ones(s.shape, dtype=torch.uint8) for s in LAYOUT.tensors}, LAYOUT)
    assert all(m.dtype == torch.bool for m in out.values())
