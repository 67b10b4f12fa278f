"""LoZO's lazy basis: V changes exactly every ν steps, U every step; refresh steps carry the previous V's seed."""

from __future__ import annotations

import torch
from zo_problems import small_layout

from scheduler.zo.lozo import LowRankPerturbation

LAYOUT = small_layout()


def test_v_changes_exactly_every_nu_steps_and_u_every_step():
    nu, num_steps = 4, 14
    perturbation = LowRankPerturbation(rank=2, basis_interval=nu)
    vs, us, seeds = [], [], []
    for step in range(num_steps):
        s = perturbation.seeds_for_step(21, step, 2)
        factors = list(perturbation.factors(LAYOUT, s))
        vs.append([v for _, _, v in factors])
        us.append([u for _, u_list, _ in factors for u in u_list])
        seeds.append(s)
    for step in range(1, num_steps):
        same_v = all(torch.equal(a, b) for a, b in zip(vs[step], vs[step - 1]))
        assert same_v == (step % nu != 0), f"step {step}"
        assert seeds[step].prev_basis_seed == (seeds[step - 1].basis_seed if step % nu == 0 else None)
        assert not any(torch.equal(a, b) for a, b in zip(us[step], us[step - 1]))
    assert seeds[0].prev_basis_seed is None
    # V of a tensor has the tensor's column count and rank k columns: A [r, in] → [in, k], B [out, r] → [r, k]
    for spec, v in zip(LAYOUT.tensors, vs[0]):
        assert v.shape == (spec.shape[1], 2)


def test_basis_is_a_pure_function_of_job_seed_and_window():
    a = LowRankPerturbation(rank=3, basis_interval=5)
    b = LowRankPerturbation(rank=3, basis_interval=5)
    assert a.seeds_for_step(1, 7, 2) == b.seeds_for_step(1, 7, 2)
    assert a.seeds_for_step(1, 7, 2).basis_seed == a.seeds_for_step(1, 9, 2).basis_seed
    assert a.seeds_for_step(1, 7, 2).basis_seed != a.seeds_for_step(2, 7, 2).basis_seed
    assert a.seeds_for_step(1, 7, 2).basis_seed not in a.seeds_for_step(1, 7, 2).direction_seeds
