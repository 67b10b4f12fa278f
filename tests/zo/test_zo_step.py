"""The step protocol: probe sets, MeZO equivalence bit for bit, the conservative rounds, seeds on the wire."""

from __future__ import annotations

import pytest
import torch
from zo_problems import Quadratic, assert_near, small_layout, start_theta

from scheduler.zo import mezo
from scheduler.zo.methods import REGISTRY, SgdHyper, build_method, parse_hyper
from scheduler.zo.zo_step import (
    Probe,
    StepSeeds,
    conservative_choice,
    finish_step,
    init_state,
    materialise_probes,
    next_probes,
    probe_values,
    probes_from_wire,
    probes_to_wire,
    reference_step,
)

LAYOUT = small_layout()


def _method(name: str, **params):
    defaults = {"lr": 0.01, "eps": 1e-2, "num_directions": 2}
    if name.startswith("lozo"):
        defaults["basis_interval"] = 3
    return build_method(name, parse_hyper(name, {**defaults, **params}))


@pytest.mark.parametrize("name", sorted(REGISTRY))
def test_probe_counts(name):
    method = _method(name, num_directions=3)
    seeds = method.perturbation.seeds_for_step(5, 0, 3)
    first = next_probes(method, seeds, (), 0.01)
    if name == "zo-sgd-cons":
        assert len(first) == 2 * 3 + 1 and first[0] == Probe()
        second = next_probes(method, seeds, (1.0,) * 7, 0.01)
        assert len(second) == 2
        assert next_probes(method, seeds, (1.0,) * 9, 0.01) is None
    else:
        assert len(first) == 6
        assert next_probes(method, seeds, (1.0,) * 6, 0.01) is None
        # slot 2i is +, 2i+1 is − of direction i
        for i in range(3):
            (plus_index, plus_scale), = first[2 * i].terms
            (minus_index, minus_scale), = first[2 * i + 1].terms
            assert plus_index == minus_index == i and plus_scale == -minus_scale != 0  # KerZOO: ε·rᵢ may be < 0


def test_mezo_probes_and_update_bitwise_equal_mezo_module():
    method = _method("mezo-sgd", num_directions=3, weight_decay=0.01)
    theta = start_theta(LAYOUT)
    seeds = method.perturbation.seeds_for_step(11, 4, 3)
    probes = next_probes(method, seeds, (), 0.01)
    ours = dict((spec.name, values) for spec, values in probe_values(theta, LAYOUT, method.perturbation, seeds, probes))
    for name, plus, minus in mezo.probe_states(theta, LAYOUT, seeds.direction_seeds, method.eps):
        for i in range(3):
            assert torch.equal(ours[name][2 * i], plus[i])
            assert torch.equal(ours[name][2 * i + 1], minus[i])
    losses = [0.3, 0.1, 0.7, 0.8, 0.2, 0.25]
    record = finish_step(method, seeds, losses, 0.05)
    expected_coeffs = mezo.update_coefficients(mezo.projected_gradients(losses[0::2], losses[1::2], method.eps))
    assert list(record.coeffs) == expected_coeffs
    state = init_state(method, LAYOUT, theta)
    method.optimiser.apply(state, LAYOUT, method.perturbation, record)
    reference = {k: v.clone() for k, v in theta.items()}
    mezo.apply_update(reference, LAYOUT, seeds.direction_seeds, expected_coeffs, 0.05, 0.01)
    assert all(torch.equal(state.theta[k], reference[k]) for k in theta)


def test_generic_sgd_matches_mezo_update_bitwise():
    from scheduler.zo.optimisers import Sgd

    method = _method("mezo-sgd", num_directions=2, weight_decay=0.1)
    theta = start_theta(LAYOUT)
    seeds = method.perturbation.seeds_for_step(3, 9, 2)
    record = finish_step(method, seeds, [1.0, 0.5, 0.2, 0.9], 0.02)
    ours = init_state(method, LAYOUT, theta)
    Sgd(0.1).apply(ours, LAYOUT, method.perturbation, record)
    mezo.apply_update(theta, LAYOUT, seeds.direction_seeds, record.coeffs, 0.02, 0.1)
    assert all(torch.equal(ours.theta[k], theta[k]) for k in theta)


def test_probes_never_write_theta_nor_alias_it():
    method = _method("zo-sgd-cons")
    theta = start_theta(LAYOUT)
    before = {k: v.clone() for k, v in theta.items()}
    seeds = method.perturbation.seeds_for_step(0, 0, 2)
    states = materialise_probes(theta, LAYOUT, method.perturbation, seeds, next_probes(method, seeds, (), 0.1))
    for state in states:
        for value in state.values():
            value.add_(1.0)  # a slot write must never reach the master θ
    assert all(torch.equal(theta[k], before[k]) for k in theta)


def test_conservative_choice_follows_zo_bench():
    # loss(θ), loss(θ − lr ĝ), loss(θ + lr ĝ) → +1 descent, −1 ascent, 0 keep
    assert conservative_choice(1.0, 0.5, 0.7) == 1
    assert conservative_choice(1.0, 0.7, 0.5) == -1
    assert conservative_choice(1.0, 1.2, 1.1) == 0
    assert conservative_choice(1.0, 1.2, 0.9) == -1
    assert conservative_choice(1.0, 1.0, 1.0) == -1  # ZO-Bench's tie: descent not strictly better than ascent


def test_conservative_candidates_and_rejection():
    method = _method("zo-sgd-cons", weight_decay=0.05)
    problem = Quadratic(LAYOUT)
    theta = start_theta(LAYOUT)
    seeds = method.perturbation.seeds_for_step(1, 0, 2)
    first = next_probes(method, seeds, (), 0.1)
    losses = tuple(problem(s) for s in materialise_probes(theta, LAYOUT, method.perturbation, seeds, first))
    candidates = next_probes(method, seeds, losses, 0.1)
    descent, ascent = materialise_probes(theta, LAYOUT, method.perturbation, seeds, candidates)
    coeffs = finish_step(method, seeds, losses + (0.0, 1.0), 0.1).coeffs  # descent chosen: coeffs are +c
    state = init_state(method, LAYOUT, theta)
    method.optimiser.apply(state, LAYOUT, method.perturbation, finish_step(method, seeds, losses + (0.0, 1.0), 0.1))
    for name in theta:
        assert_near(descent[name], state.theta[name], 1e-6)
    # rejected: θ unchanged bit for bit, even with weight decay
    rejected = finish_step(method, seeds, losses[:1] + losses[1:] + (losses[0] + 1, losses[0] + 1), 0.1)
    assert rejected.lr == 0.0 and all(c == 0.0 for c in rejected.coeffs)
    kept = init_state(method, LAYOUT, theta)
    method.optimiser.apply(kept, LAYOUT, method.perturbation, rejected)
    assert all(torch.equal(kept.theta[k], theta[k]) for k in theta)
    # ascent candidate is (1 − lr·wd)·θ + lr·ĝ
    directions = {spec.name: ds for spec, ds in method.perturbation.stream(LAYOUT, seeds)}
    for name in theta:
        g_hat = sum(c * d for c, d in zip(coeffs, directions[name], strict=True))
        assert_near(ascent[name], theta[name] * (1 - 0.1 * 0.05) + 0.1 * g_hat, 1e-6)


def test_conservative_never_increases_the_loss_where_sgd_does():
    problem = Quadratic(LAYOUT)
    lr = 0.1  # large enough that plain MeZO-SGD overshoots and diverges here
    sgd, cons = _method("mezo-sgd", lr=lr), _method("zo-sgd-cons", lr=lr)
    s_sgd, s_cons = init_state(sgd, LAYOUT, start_theta(LAYOUT)), init_state(cons, LAYOUT, start_theta(LAYOUT))
    sgd_up, cons_losses = 0, [problem(s_cons.theta)]
    for step in range(60):
        before = problem(s_sgd.theta)
        reference_step(sgd, s_sgd, LAYOUT, 2, step, lr, problem)
        sgd_up += problem(s_sgd.theta) > before
        reference_step(cons, s_cons, LAYOUT, 2, step, lr, problem)
        cons_losses.append(problem(s_cons.theta))
    assert sgd_up > 0
    assert all(b <= a + 1e-9 for a, b in zip(cons_losses, cons_losses[1:]))
    assert cons_losses[-1] < 0.5 * cons_losses[0]


def test_finish_step_checks_loss_count():
    method = _method("mezo-sgd")
    seeds = method.perturbation.seeds_for_step(0, 0, 2)
    with pytest.raises(ValueError, match="losses"):
        finish_step(method, seeds, [1.0, 2.0, 3.0], 0.1)


@pytest.mark.parametrize("name", ["mezo-sgd", "lozo", "lozo-m"])
def test_step_seeds_round_trip_through_a_flat_tuple(name):
    method = _method(name)
    for step in range(7):
        seeds = method.perturbation.seeds_for_step(42, step, 2)
        assert StepSeeds.from_tuple(step, seeds.as_tuple(), 2) == seeds
        assert all(0 <= s < 2**64 for s in seeds.as_tuple())


def test_hyper_type_must_match_method():
    with pytest.raises(ValueError):
        build_method("zo-adam", SgdHyper())


@pytest.mark.parametrize("name", ["zo-sgd-cons", "kerzoo"])
def test_probes_round_trip_through_the_wire(name):
    method = _method(name)
    seeds = method.perturbation.seeds_for_step(8, 3, 2)
    probes = next_probes(method, seeds, (), 0.1)
    assert probes_from_wire(probes_to_wire(probes)) == probes
