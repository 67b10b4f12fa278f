"""Estimator expectations by Monte-Carlo with fixed seeds, and KerZOO's kernel moments and bias cancellation.

On a quadratic the central difference is exact, so ĝ = Σ cᵢdᵢ has expectation E[w·d dᵀ]·∇L: ∇L for Gaussian,
LoZO (fresh V every step) and KerZOO; S²∇L with block scales; m⊙∇L with a mask. Each run draws 1500 steps of
q = 2 directions; the test asserts every coordinate of the mean lies within 5 standard errors of the expected
value (the standard error is estimated from the same samples) and the error norm is < 2·‖standard errors‖.
"""

from __future__ import annotations

from fractions import Fraction

import pytest
import torch
from zo_problems import Quadratic, dense_estimate, flat, small_layout, start_theta

from scheduler.zo.block_scales import normalise_scales
from scheduler.zo.kerzoo import KERNEL_COEFFS, kernel, radius
from scheduler.zo.methods import build_method, parse_hyper
from scheduler.zo.sparse_mask import topk_mask
from scheduler.zo.zo_step import finish_step, materialise_probes, next_probes

LAYOUT = small_layout()
NUM_STEPS = 1500


def _mean_estimate(method, problem, theta):
    samples = []
    for step in range(NUM_STEPS):
        seeds = method.perturbation.seeds_for_step(1234, step, method.num_directions)
        probes = next_probes(method, seeds, (), 0.1)
        losses = [problem(s) for s in materialise_probes(theta, LAYOUT, method.perturbation, seeds, probes)]
        record = finish_step(method, seeds, losses, 0.1)
        samples.append(flat(dense_estimate(method, LAYOUT, seeds, record.coeffs), LAYOUT))
    stacked = torch.stack(samples)  # [steps, N]
    return stacked.mean(0), stacked.std(0) / NUM_STEPS**0.5


def _check(mean, stderr, expected):
    z = (mean - expected).abs() / stderr.clamp_min(1e-12)
    assert float(z.max()) < 5.0, f"worst coordinate {float(z.max()):.2f} standard errors off"
    # the whole vector: error norm within twice its expected size, and the test has power (‖se‖ < 0.35‖E‖)
    assert float((mean - expected).norm()) < 2 * float(stderr.norm())
    assert float(stderr.norm()) < 0.35 * float(expected.norm())


def _setup():
    problem = Quadratic(LAYOUT)
    theta = start_theta(LAYOUT)
    return problem, theta, flat(problem.grad(theta), LAYOUT)


@pytest.mark.parametrize("name", ["mezo-sgd", "kerzoo", "lozo"])
def test_unbiased_estimators(name):
    params = {"lr": 0.1, "eps": 1e-3, "num_directions": 2}
    if name == "lozo":
        params |= {"rank": 2, "basis_interval": 1}  # V fresh every step: unbiased over (U, V)
    method = build_method(name, parse_hyper(name, params))
    problem, theta, grad = _setup()
    mean, stderr = _mean_estimate(method, problem, theta)
    _check(mean, stderr, grad)


def test_block_scaled_estimator_is_preconditioned_by_s_squared():
    raw = {spec.name: float(i + 1) for i, spec in enumerate(LAYOUT.tensors)}
    scales = normalise_scales(raw, LAYOUT)
    method = build_method("mezo-sgd", parse_hyper("mezo-sgd", {"eps": 1e-3, "num_directions": 2}), block_scales=scales)
    problem, theta, grad = _setup()
    s2 = torch.cat([torch.full((spec.numel,), scales[spec.name] ** 2, dtype=torch.float64) for spec in LAYOUT.tensors])
    mean, stderr = _mean_estimate(method, problem, theta)
    _check(mean, stderr, s2 * grad)


def test_masked_estimator_is_the_masked_gradient():
    g = torch.Generator().manual_seed(5)
    mask = topk_mask({s.name: torch.rand(s.shape, generator=g) for s in LAYOUT.tensors}, LAYOUT, 0.4)
    method = build_method("mezo-sgd", parse_hyper("mezo-sgd", {"eps": 1e-3, "num_directions": 2}), mask=mask)
    problem, theta, grad = _setup()
    m = flat({k: v.to(torch.float64) for k, v in mask.items()}, LAYOUT)
    mean, stderr = _mean_estimate(method, problem, theta)
    assert torch.equal(mean[m == 0], torch.zeros_like(mean[m == 0]))  # exactly zero off the mask
    keep = m == 1
    _check(mean[keep], stderr[keep], grad[keep])


# --------------------------------------------------------------------------------------------- KerZOO kernel
def _uniform_moment(power: int) -> Fraction:
    """E[r^power] for r ~ U[−1, 1]."""
    return Fraction(0) if power % 2 else Fraction(1, power + 1)


def test_kernel_moments_exact():
    first = sum(c * _uniform_moment(p + 1) for p, c in KERNEL_COEFFS.items())
    third = sum(c * _uniform_moment(p + 3) for p, c in KERNEL_COEFFS.items())
    assert first == 1 and third == 0


def test_kernel_moments_by_quadrature_and_monte_carlo():
    # Gauss–Legendre with 8 nodes is exact for polynomials up to degree 15 (r⁴·K(r) has degree 7).
    import numpy as np

    nodes, weights = np.polynomial.legendre.leggauss(8)
    first = sum(w * r * kernel(r) for r, w in zip(nodes, weights)) / 2
    third = sum(w * r**3 * kernel(r) for r, w in zip(nodes, weights)) / 2
    assert abs(first - 1) < 1e-12 and abs(third) < 1e-12
    # the radii the module actually draws: 20 000 of them, tolerance 5 standard errors
    rs = torch.tensor([radius(seed) for seed in range(20_000)], dtype=torch.float64)
    assert float(rs.min()) >= -1 and float(rs.max()) < 1
    ks = rs * (75 / 4) - rs**3 * (105 / 4)
    for values, target in ((rs * ks, 1.0), (rs**3 * ks, 0.0)):
        assert abs(float(values.mean()) - target) < 5 * float(values.std()) / len(values) ** 0.5


def test_kernel_cancels_the_cubic_bias():
    """f(x) = Σ aⱼxⱼ³: MeZO's estimate has bias ε²·(Σ aⱼzⱼ³)·z per z; KerZOO's r-average removes it exactly."""
    import numpy as np

    eps, dim = 0.3, 5
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(dim, generator=gen, dtype=torch.float64)
    x = torch.randn(dim, generator=gen, dtype=torch.float64)

    def f(v):
        return float((a * v**3).sum())

    grad = 3 * a * x**2
    nodes, weights = np.polynomial.legendre.leggauss(8)
    for _ in range(5):
        z = torch.randn(dim, generator=gen, dtype=torch.float64)
        mezo = (f(x + eps * z) - f(x - eps * z)) / (2 * eps) * z
        kerzoo = sum(
            w / 2 * (f(x + eps * r * z) - f(x - eps * r * z)) / (2 * eps) * kernel(r) * z
            for r, w in zip(nodes, weights)
        )
        exact = float(grad @ z) * z  # the noiseless directional estimate ⟨∇f, z⟩·z
        assert float((mezo - exact).abs().max()) > 1e-3  # the cubic term is there for MeZO
        assert float((kerzoo - exact).abs().max()) < 1e-10
