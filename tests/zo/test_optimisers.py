"""Each update rule against its definition, step by step, with a float64 re-implementation of the formula.

Records are fabricated (arbitrary coefficients), so the optimiser alone is under test. Tolerance 1e-5
absolute: the code runs in fp32, the reference in fp64, over three to five steps.
"""

from __future__ import annotations

import torch
from zo_problems import assert_near, dense_estimate, small_layout, start_theta

from scheduler.zo.methods import build_method, parse_hyper
from scheduler.zo.zo_step import StepRecord, init_state

LAYOUT = small_layout()
COEFFS = [(0.7, -1.3), (-0.4, 0.9), (1.1, 0.2), (-0.8, -0.5), (0.3, 1.6)]
LR, WD = 0.05, 0.1


def _records(method, num_steps):
    out = []
    for step in range(num_steps):
        seeds = method.perturbation.seeds_for_step(77, step, 2)
        out.append(StepRecord(seeds, (), COEFFS[step], LR))
    return out


def _run(name, num_steps, **params):
    method = build_method(name, parse_hyper(name, {"num_directions": 2, "weight_decay": WD, **params}))
    theta0 = start_theta(LAYOUT)
    state = init_state(method, LAYOUT, theta0)
    records = _records(method, num_steps)
    history = []
    for record in records:
        method.optimiser.apply(state, LAYOUT, method.perturbation, record)
        history.append(state.clone())
    reference = {k: v.to(torch.float64) for k, v in theta0.items()}
    return method, reference, records, history


def test_sign_sgd():
    method, theta, records, history = _run("zo-sgd-sign", 3)
    for record, state in zip(records, history):
        g = dense_estimate(method, LAYOUT, record.seeds, record.coeffs)
        theta = {k: v - LR * (torch.sign(g[k]) + WD * v) for k, v in theta.items()}
        for k in theta:
            assert_near(state.theta[k], theta[k], 1e-5)


def test_momentum_sgd():
    beta = 0.8
    method, theta, records, history = _run("zo-sgd-mmt", 4, momentum=beta)
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    for record, state in zip(records, history):
        g = dense_estimate(method, LAYOUT, record.seeds, record.coeffs)
        m = {k: beta * m[k] + g[k] + WD * theta[k] for k in theta}
        theta = {k: theta[k] - LR * m[k] for k in theta}
        for k in theta:
            assert_near(state.theta[k], theta[k], 1e-5)
            assert_near(state.buffers[f"momentum:{k}"], m[k], 1e-5)


def test_adam_with_bias_correction():
    b1, b2, adam_eps = 0.9, 0.99, 1e-8
    method, theta, records, history = _run("zo-adam", 4, beta1=b1, beta2=b2, adam_eps=adam_eps)
    m = {k: torch.zeros_like(v) for k, v in theta.items()}
    v = {k: torch.zeros_like(x) for k, x in theta.items()}
    for t, (record, state) in enumerate(zip(records, history), start=1):
        g = dense_estimate(method, LAYOUT, record.seeds, record.coeffs)
        g = {k: g[k] + WD * theta[k] for k in theta}
        m = {k: b1 * m[k] + (1 - b1) * g[k] for k in theta}
        v = {k: b2 * v[k] + (1 - b2) * g[k] ** 2 for k in theta}
        theta = {
            k: theta[k] - LR * (m[k] / (1 - b1**t)) / ((v[k] / (1 - b2**t)).sqrt() + adam_eps) for k in theta
        }
        for k in theta:
            assert_near(state.theta[k], theta[k], 1e-5)
            assert_near(state.buffers[f"adam_m:{k}"], m[k], 1e-6)
            assert_near(state.buffers[f"adam_v:{k}"], v[k], 1e-6)


def test_lozo_sgd_directions_are_rank_k_and_update_is_sgd():
    method, theta, records, history = _run("lozo", 3, rank=1, basis_interval=2)
    for record, state in zip(records, history):
        g = dense_estimate(method, LAYOUT, record.seeds, record.coeffs)
        for spec, ds in method.perturbation.stream(LAYOUT, record.seeds):
            assert all(ds_i.shape == spec.shape and torch.linalg.matrix_rank(ds_i) == 1 for ds_i in ds)
        theta = {k: theta[k] - LR * (g[k] + WD * theta[k]) for k in theta}
        for k in theta:
            assert_near(state.theta[k], theta[k], 1e-5)


def test_lozo_m_momentum_in_u_space_with_basis_refresh():
    beta, k_rank, nu = 0.7, 2, 2
    method, theta, records, history = _run("lozo-m", 5, rank=k_rank, basis_interval=nu, momentum=beta)
    perturbation = method.perturbation
    n_buf = {spec.name: torch.zeros(spec.shape[0], k_rank, dtype=torch.float64) for spec in LAYOUT.tensors}
    previous_v = None
    for step, (record, state) in enumerate(zip(records, history)):
        factors = {spec.name: (us, v) for spec, us, v in perturbation.factors(LAYOUT, record.seeds)}
        for name, (us, v) in factors.items():
            us, v = [u.double() for u in us], v.double()
            g_u = sum(c * u for c, u in zip(record.coeffs, us))
            if step == 0:
                n_buf[name] = g_u
            elif step % nu == 0:
                v_old = previous_v[name]
                n_buf[name] = beta * n_buf[name] @ v_old.T @ v / v.shape[0] + (1 - beta) * g_u
            else:
                n_buf[name] = beta * n_buf[name] + (1 - beta) * g_u
            theta[name] = theta[name] - LR * (n_buf[name] @ v.T + WD * theta[name])
            assert_near(state.buffers[f"lozo_m:{name}"], n_buf[name], 1e-5)
            assert_near(state.theta[name], theta[name], 1e-5)
        previous_v = {name: v.double() for name, (_, v) in factors.items()}
