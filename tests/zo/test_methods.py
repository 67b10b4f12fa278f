"""The registry and hyper-parameter validation: bad input raises InvalidHyperParameter naming the field."""

from __future__ import annotations

import pytest
import torch
from zo_problems import small_layout

from scheduler.zo.methods import (
    REGISTRY,
    InvalidHyperParameter,
    build_method,
    hyper_items,
    parse_hyper,
)
from scheduler.zo.optimisers import MezoSgd, Sgd

LAYOUT = small_layout()


def test_registry_names():
    assert set(REGISTRY) == {
        "mezo-sgd", "zo-sgd-sign", "zo-sgd-mmt", "zo-adam", "zo-sgd-cons", "lozo", "lozo-m", "kerzoo",
        "lozo-bank",
    }


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_defaults_build_and_round_trip_through_hparams(name):
    hyper = parse_hyper(name, {})
    method = build_method(name, hyper)
    assert method.name == name and method.num_directions == hyper.num_directions
    # a version record stores floats: parse_hyper takes them back, integral floats for int fields included
    as_floats = {k: float(v) for k, v in hyper_items(hyper)}
    assert parse_hyper(name, as_floats) == hyper


@pytest.mark.parametrize(
    "name, params, field",
    [
        ("mezo-sgd", {"lr": 0.0}, "lr"),
        ("mezo-sgd", {"lr": float("inf")}, "lr"),
        ("mezo-sgd", {"eps": -1e-3}, "eps"),
        ("mezo-sgd", {"num_directions": 0}, "num_directions"),
        ("mezo-sgd", {"num_directions": 2.5}, "num_directions"),
        ("mezo-sgd", {"num_directions": True}, "num_directions"),
        ("mezo-sgd", {"weight_decay": -0.1}, "weight_decay"),
        ("mezo-sgd", {"momentum": 0.9}, "momentum"),  # not a hyper-parameter of mezo-sgd
        ("zo-sgd-mmt", {"momentum": 1.0}, "momentum"),
        ("zo-adam", {"beta1": -0.1}, "beta1"),
        ("zo-adam", {"beta2": 1.0}, "beta2"),
        ("zo-adam", {"adam_eps": 0.0}, "adam_eps"),
        ("lozo", {"rank": 0}, "rank"),
        ("lozo", {"basis_interval": 0}, "basis_interval"),
        ("lozo-m", {"momentum": "high"}, "momentum"),
        ("lozo-bank", {"momentum": 1.0}, "momentum"),
        ("lozo-bank", {"weight_decay": 0.1}, "weight_decay"),  # would shrink the window's V rows
        ("sgd-of-dreams", {}, "method"),
    ],
)
def test_invalid_hyper_names_the_field(name, params, field):
    with pytest.raises(InvalidHyperParameter) as info:
        parse_hyper(name, params)
    assert info.value.field == field
    assert isinstance(info.value, ValueError)


def test_artifacts_choose_the_update_and_are_checked():
    scales = {s.name: 1.0 for s in LAYOUT.tensors}
    mask = {s.name: torch.ones(s.shape, dtype=torch.bool) for s in LAYOUT.tensors}
    assert isinstance(build_method("mezo-sgd", parse_hyper("mezo-sgd", {})).optimiser, MezoSgd)
    assert isinstance(build_method("mezo-sgd", parse_hyper("mezo-sgd", {}), block_scales=scales).optimiser, Sgd)
    for name, artifact in (("lozo", {"mask": mask}), ("kerzoo", {"block_scales": scales}), ("lozo-m", {"mask": mask})):
        with pytest.raises(InvalidHyperParameter) as info:
            build_method(name, parse_hyper(name, {}), **artifact)
        assert info.value.field in artifact
    with pytest.raises(InvalidHyperParameter) as info:
        build_method("zo-adam", parse_hyper("zo-adam", {"weight_decay": 0.1}), mask=mask)
    assert info.value.field == "weight_decay"
