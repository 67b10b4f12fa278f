"""LoZO-bank against its formulas: probes move ΔW by ±ε·UVᵀ, the lazy V, the bank's rank schedule, truncated
SVD re-compression, descent on a dense least-squares problem, bitwise replay, and the one probe path."""

from __future__ import annotations

import pytest
import torch
from zo_problems import assert_near, start_theta

from scheduler.zo.lora_layout import LoraShape, layout_for_linears
from scheduler.zo.lozo_bank import BankPerturbation, bank_rank, truncated_factors
from scheduler.zo.methods import InvalidHyperParameter, build_method, parse_hyper
from scheduler.zo.zo_step import (
    StepRecord,
    StepSeeds,
    TrainState,
    apply_record,
    init_state,
    materialise_probes,
    next_probes,
    probe_values,
    reference_step,
    replay,
    step_base,
)

R, K, NU = 5, 2, 3  # rank budget, window rank, basis interval: windows use 0, 2, 3, 3, … bank columns
LAYOUT = layout_for_linears(
    {"model.layers.0.self_attn.q_proj": (8, 7), "model.layers.0.self_attn.v_proj": (6, 4)},
    LoraShape(rank=R, alpha=10.0, target_modules=("q_proj", "v_proj")),
)
MODULES = sorted({s.module for s in LAYOUT.tensors})
COEFFS = [(0.7, -1.3), (-0.4, 0.9), (1.1, 0.2), (-0.8, -0.5), (0.3, 1.6), (0.5, -0.6)]
JOB_SEED = 31


def _name(module: str, kind: str) -> str:
    return f"base_model.model.{module}.lora_{kind}.weight"


def _delta(theta: dict[str, torch.Tensor], module: str) -> torch.Tensor:
    """ΔW = B·A [out, in] in float64."""
    return theta[_name(module, "B")].to(torch.float64) @ theta[_name(module, "A")].to(torch.float64)


def _method(**params):
    params = {"lr": 0.05, "eps": 1e-2, "num_directions": 2, "rank": K, "basis_interval": NU, **params}
    hyper = parse_hyper("lozo-bank", params)
    return build_method("lozo-bank", hyper), hyper


def _fabricated(method, num_steps: int, theta0=None) -> tuple[TrainState, list[TrainState], list[StepRecord]]:
    """Apply fabricated records (the optimiser alone under test); history[t] is the state after step t."""
    state = init_state(method, LAYOUT, start_theta(LAYOUT) if theta0 is None else theta0)
    history, records = [], []
    for step in range(num_steps):
        seeds = method.perturbation.seeds_for_step(JOB_SEED, step, 2)
        record = StepRecord(seeds, (), COEFFS[step % len(COEFFS)], 0.05)
        apply_record(method, state, LAYOUT, record)
        history.append(state.clone())
        records.append(record)
    return state, history, records


def _basis(perturbation, seeds) -> dict[str, torch.Tensor]:
    return {spec.module: v for spec, v in perturbation.basis(LAYOUT, seeds.basis_seed)}


def _us(perturbation, seeds) -> dict[str, list[torch.Tensor]]:
    return {spec.module: us for spec, us in perturbation.factors(LAYOUT, seeds)}


def test_bank_rank_schedule():
    assert [bank_rank(w, K, R) for w in range(6)] == [0, 2, 3, 3, 3, 3]
    assert [bank_rank(w, 1, 4) for w in range(5)] == [0, 1, 2, 3, 3]


@pytest.mark.parametrize("step", [0, 1, 3, 4, 6, 8, 9])  # window starts (0, 3, 6, 9) and steps inside windows
def test_probe_moves_delta_w_by_exactly_eps_u_vt(step):
    method, _ = _method()
    p = method.perturbation
    state = _fabricated(method, step)[0] if step else init_state(method, LAYOUT, start_theta(LAYOUT))
    seeds = p.seeds_for_step(JOB_SEED, step, 2)
    base = step_base(p, state.theta, LAYOUT, seeds)
    probes = next_probes(method, seeds, (), 0.05)
    states = materialise_probes(state.theta, LAYOUT, p, seeds, probes)
    vs, us = _basis(p, seeds), _us(p, seeds)
    window = p.window(LAYOUT, step)
    for module in MODULES:
        a = base[_name(module, "A")]
        assert torch.equal(a[window], vs[module].T), "the window's A rows are Vᵀ of the step's window"
        for j, probe_state in enumerate(states):
            i, sign = j // 2, 1.0 if j % 2 == 0 else -1.0
            assert torch.equal(probe_state[_name(module, "A")], a), "A is never perturbed"
            change = _delta(probe_state, module) - _delta(base, module)
            expected = sign * method.eps * us[module][i].to(torch.float64) @ vs[module].T.to(torch.float64)
            assert_near(change, expected, 1e-6)
    # the worker's streaming writer sees the same probe states
    streamed = {spec.name: values for spec, values in probe_values(state.theta, LAYOUT, p, seeds, probes)}
    assert all(torch.equal(streamed[n][j], s[n]) for j, s in enumerate(states) for n in s)
    # probing never writes θ; at a window start the base is a new state, inside a window θ itself
    assert (base is state.theta) == (step % NU != 0)


def test_v_changes_exactly_every_nu_steps_and_u_every_step():
    method, _ = _method()
    p = method.perturbation
    _, history, records = _fabricated(method, 13)
    for step in range(1, 13):
        same_seed = records[step].seeds.basis_seed == records[step - 1].seeds.basis_seed
        assert same_seed == (step % NU != 0), f"step {step}"
        expected_prev = records[step - 1].seeds.basis_seed if step % NU == 0 else None  # LoZO-M's refresh mark
        assert records[step].seeds.prev_basis_seed == expected_prev
        u_now, u_before = _us(p, records[step].seeds), _us(p, records[step - 1].seeds)
        assert not any(torch.equal(u_now[m][0], u_before[m][0]) for m in MODULES)
        window, before = p.window(LAYOUT, step), p.window(LAYOUT, step - 1)
        for module in MODULES:  # the window's A rows hold the basis, unchanged inside a window
            a_now, a_before = history[step].theta[_name(module, "A")], history[step - 1].theta[_name(module, "A")]
            assert torch.equal(a_now[window], _basis(p, records[step].seeds)[module].T)
            if step % NU:
                assert torch.equal(a_now, a_before)
            else:
                assert not torch.equal(a_now[window], a_before[before])


def test_bank_grows_by_the_window_rank_and_never_past_the_budget():
    method, _ = _method()
    p = method.perturbation
    _, history, _ = _fabricated(method, 5 * NU)
    for step, state in enumerate(history):
        used = bank_rank(step // NU, K, R)
        assert p.window(LAYOUT, step) == slice(used, used + K) and used + K <= R
        for module in MODULES:
            a, b = state.theta[_name(module, "A")], state.theta[_name(module, "B")]
            assert not a[used + K :].any() and not b[:, used + K :].any(), "columns past the window stay 0"
            assert b[:, used : used + K].any(), "the window trained"
            rank = int(torch.linalg.matrix_rank(_delta(state.theta, module)))
            assert rank <= min(used + K, *_delta(state.theta, module).shape)
            if step < NU:
                assert rank == K
    # entering windows 1, 2 grows the bank by k (2 → then capped at R − k = 3)
    assert [bank_rank(s // NU, K, R) for s in (0, NU, 2 * NU, 3 * NU)] == [0, 2, 3, 3]


def test_window_zero_starts_from_zero_delta_whatever_the_adapter_held():
    method, _ = _method()
    p = method.perturbation
    theta0 = start_theta(LAYOUT)  # B ≠ 0: a non-zero ΔW that lozo-bank discards
    state, _, records = _fabricated(method, 1, theta0)
    seeds, coeffs = records[0].seeds, records[0].coeffs
    vs, us = _basis(p, seeds), _us(p, seeds)
    for module in MODULES:
        g = sum(c * u.to(torch.float64) for c, u in zip(coeffs, us[module]))  # [out, k]
        assert_near(_delta(state.theta, module), -0.05 * g @ vs[module].T.to(torch.float64), 1e-6)


def test_recompression_is_the_best_rank_budget_approximation_and_the_window_is_fresh():
    method, _ = _method()
    p = method.perturbation
    before = _fabricated(method, 2 * NU)[0]  # the state after window 1: 4 live columns > R − k = 3
    seeds = p.seeds_for_step(JOB_SEED, 2 * NU, 2)
    kept = before.clone()
    entered = p.entered(before.theta, LAYOUT, seeds)
    used = R - K
    vs = _basis(p, seeds)
    for module in MODULES:
        live = _delta(before.theta, module)
        assert int(torch.linalg.matrix_rank(live)) > used or live.shape[0] <= used
        u, s, vh = torch.linalg.svd(live, full_matrices=False)
        best = (u[:, :used] * s[:used]) @ vh[:used]
        a, b = entered[_name(module, "A")], entered[_name(module, "B")]
        bank = b[:, :used].to(torch.float64) @ a[:used].to(torch.float64)
        assert_near(bank, best, 1e-5 * float(s[0]))
        assert torch.equal(a[used:], vs[module].T) and not b[:, used:].any(), "a fresh window after the bank"
        assert_near(_delta(entered, module), best, 1e-5 * float(s[0]))  # a fresh window adds nothing to ΔW
    assert all(torch.equal(before.theta[n], v) for n, v in kept.theta.items()), "entering never writes θ"


@pytest.mark.parametrize("shape, rank, k", [((9, 7), 4, 2), ((5, 12), 6, 3), ((6, 6), 2, 4)])
def test_truncated_factors_match_a_dense_svd(shape, rank, k):
    g = torch.Generator().manual_seed(rank * 10 + k)
    b = torch.randn((shape[0], rank), generator=g)
    a = torch.randn((rank, shape[1]), generator=g)
    b_k, a_k = truncated_factors(b, a, k)
    assert b_k.shape == (shape[0], k) and a_k.shape == (k, shape[1]) and b_k.dtype == a_k.dtype == torch.float32
    u, s, vh = torch.linalg.svd(b.double() @ a.double(), full_matrices=False)
    m = min(k, rank)
    assert_near(b_k.double() @ a_k.double(), (u[:, :m] * s[:m]) @ vh[:m], 1e-5 * float(s[0]))
    assert not b_k[:, m:].any() and not a_k[m:].any()  # rank < k: zero-padded
    again = truncated_factors(b.clone(), a.clone(), k)
    assert torch.equal(again[0], b_k) and torch.equal(again[1], a_k)  # deterministic, signs included
    pivot = b_k[:, :m].abs().argmax(0)
    assert (b_k[:, :m].gather(0, pivot[None])[0] > 0).all()


class LeastSquares:
    """L(θ) = Σ_modules ½‖(W* − ΔW)·X‖² / n, targets W* of rank 2 per module, in float64."""

    def __init__(self, seed: int = 0, n: int = 16) -> None:
        g = torch.Generator().manual_seed(seed)
        self.targets, self.inputs = {}, {}
        for module in MODULES:
            a_spec = next(s for s in LAYOUT.tensors if s.module == module and s.kind == "A")
            b_spec = next(s for s in LAYOUT.tensors if s.module == module and s.kind == "B")
            out_f, in_f = b_spec.shape[0], a_spec.shape[1]
            self.targets[module] = torch.randn((out_f, 2), generator=g, dtype=torch.float64) @ torch.randn(
                (2, in_f), generator=g, dtype=torch.float64
            ) / in_f**0.5
            self.inputs[module] = torch.randn((in_f, n), generator=g, dtype=torch.float64) / n**0.5

    def __call__(self, theta: dict[str, torch.Tensor]) -> float:
        total = 0.0
        for module in MODULES:
            residual = (self.targets[module] - _delta(theta, module)) @ self.inputs[module]
            total += 0.5 * float((residual * residual).sum())
        return total


def _train(num_steps: int, problem, **params):
    method, hyper = _method(**params)
    state0 = init_state(method, LAYOUT, start_theta(LAYOUT))
    state = state0.clone()
    records = [reference_step(method, state, LAYOUT, JOB_SEED, step, hyper.lr, problem) for step in range(num_steps)]
    return method, state0, state, records


def test_descent_on_a_dense_least_squares_problem():
    problem = LeastSquares()
    zero = problem({n: torch.zeros(s.shape) for s in LAYOUT.tensors for n in [s.name]})  # L at ΔW = 0
    # ν = 5: 80 windows, so the bank is re-compressed 78 times on the way (measured 11.94 → 0.115)
    method, _, state, _ = _train(400, problem, lr=0.01, basis_interval=5)
    end = problem(state.theta)
    assert end < 0.05 * zero, f"{zero:.4f} → {end:.4f}"


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_replay_from_records_is_bitwise(momentum):
    # three window entries, two compressions
    method, state0, state, records = _train(4 * NU + 1, LeastSquares(), momentum=momentum)
    stored = [(r.seeds.step, r.seeds.as_tuple(), r.coeffs, r.lr) for r in records]
    rebuilt = [StepRecord(StepSeeds.from_tuple(s, seeds, 2), (), c, lr) for s, seeds, c, lr in stored]
    replayed = replay(method, state0, LAYOUT, rebuilt)
    assert all(torch.equal(replayed.theta[k], state.theta[k]) for k in state.theta)
    snapshot = replay(method, state0, LAYOUT, rebuilt[: 2 * NU])  # a snapshot just before a window entry
    resumed = replay(method, snapshot, LAYOUT, rebuilt[2 * NU :])
    assert all(torch.equal(resumed.theta[k], state.theta[k]) for k in state.theta)
    assert replayed.buffers.keys() == state.buffers.keys() == resumed.buffers.keys()
    assert len(state.buffers) == (2 if momentum else 0)
    assert all(torch.equal(replayed.buffers[k], v) and torch.equal(resumed.buffers[k], v) for k, v in state.buffers.items())
    assert not all(torch.equal(state0.theta[k], state.theta[k]) for k in state.theta)


def test_rank_must_stay_below_the_adapter_rank_and_weight_decay_is_rejected():
    method, _ = _method(rank=R)
    seeds = method.perturbation.seeds_for_step(JOB_SEED, 0, 2)
    with pytest.raises(ValueError, match="rank"):
        materialise_probes(start_theta(LAYOUT), LAYOUT, method.perturbation, seeds, next_probes(method, seeds, (), 0.1))
    with pytest.raises(InvalidHyperParameter) as info:
        _method(weight_decay=0.01)
    assert info.value.field == "weight_decay"


def test_probe_base_is_the_identity_for_other_methods():
    method = build_method("lozo", parse_hyper("lozo", {}))
    theta = start_theta(LAYOUT)
    seeds = method.perturbation.seeds_for_step(1, 0, 1)
    assert step_base(method.perturbation, theta, LAYOUT, seeds) is theta
    assert isinstance(_method()[0].perturbation, BankPerturbation)


def test_momentum_is_lozo_m_in_the_window_u_space():
    beta = 0.8
    method, _ = _method(momentum=beta)
    p = method.perturbation
    num_steps = 2 * NU + 2  # window entries at steps 3 and 6
    _, history, records = _fabricated(method, num_steps)
    n_ref = {m: None for m in MODULES}  # float64 reference N [out, k] per module
    for step, record in enumerate(records):
        seeds = record.seeds
        us, vs = _us(p, seeds), _basis(p, seeds)
        window = p.window(LAYOUT, step)
        before = history[step - 1].theta if step else None
        for module in MODULES:
            g = sum(c * u.to(torch.float64) for c, u in zip(record.coeffs, us[module]))  # [out, k]
            if step == 0:
                n_ref[module] = g
            elif step % NU == 0:
                v_old = _basis(p, records[step - 1].seeds)[module].to(torch.float64)
                v_new = vs[module].to(torch.float64)
                n_ref[module] = beta * n_ref[module] @ v_old.T @ v_new / v_new.shape[0] + (1 - beta) * g
            else:
                n_ref[module] = beta * n_ref[module] + (1 - beta) * g
            state = history[step]
            assert_near(state.buffers[f"bank_m:{_name(module, 'B')}"], n_ref[module], 1e-5)
            # the window's B: 0 at entry (or the previous step's value inside a window), minus lr·N
            start = torch.zeros_like(n_ref[module]) if step % NU == 0 else before[_name(module, "B")][:, window]
            expected = start.to(torch.float64) - 0.05 * n_ref[module]
            assert_near(state.theta[_name(module, "B")][:, window], expected, 1e-5)
