"""Engine path vs the transformers+PEFT baseline loop for every non-MeZO method: one short run each.

Same seeds, same minibatches, same step protocol on both sides (`BaselineZoTrainer`); only the forward pass
differs. Per step the projected gradients must agree within 1e-3 relative (floored at the run's RMS, as in
`test_parity.py`), and the final θ and optimiser buffers within 1e-4 max abs.
"""

from __future__ import annotations

import uuid

import pytest

from scheduler.baseline import BaselineConfig, BaselineZoTrainer
from scheduler.datasets import load_sst2
from scheduler.engine_step import run_engine_step
from scheduler.objectives import ClassificationObjective
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir
from scheduler.zo.methods import build_method, hyper_items, parse_hyper

NUM_STEPS = 10
BATCH_SIZE = 4
JOB_SEED = 23
# ε = 1e-2 as in test_parity.py: smaller ε amplifies the ~1e-7 fp32 difference of the two forwards.
COMMON = {"eps": 1e-2, "num_directions": 2}

CASES = [
    ("zo-sgd-sign", {"lr": 1e-3}),
    ("zo-sgd-mmt", {"lr": 1e-3, "momentum": 0.9}),
    ("zo-adam", {"lr": 1e-3}),
    # A large lr makes the three candidates' losses clearly distinct, so both sides take the same branch.
    ("zo-sgd-cons", {"lr": 5e-2}),
    ("lozo", {"lr": 5e-3, "rank": 2, "basis_interval": 4}),  # ν = 4: two V refreshes within the run
    ("lozo-m", {"lr": 5e-3, "rank": 2, "basis_interval": 4, "momentum": 0.9}),
    ("kerzoo", {"lr": 1e-3}),
    # ν = 2: five windows in ten steps, so the bank fills R − k = 6 columns and is re-compressed at step 8
    ("lozo-bank", {"lr": 5e-3, "rank": 2, "basis_interval": 2}),
]


def _rms(values: list[float]) -> float:
    return (sum(v * v for v in values) / len(values)) ** 0.5


def _max_rel(engine: list[float], baseline: list[float]) -> float:
    """Relative to each value, floored at the run's RMS so that near-zero values do not blow the ratio up."""
    rms = _rms(baseline)
    return max(abs(e - b) / max(abs(b), rms, 1e-12) for e, b in zip(engine, baseline, strict=True))


def _max_abs(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0)


@pytest.mark.parametrize("method_name, params", CASES, ids=[c[0] for c in CASES])
async def test_method_matches_baseline(engine, opt_model_dir, method_name, params):
    hyper = parse_hyper(method_name, {**COMMON, **params})
    method = build_method(method_name, hyper)
    layout = layout_for_model_dir(opt_model_dir, LoraShape(8, 16.0, ("q_proj", "v_proj")))
    theta0 = initial_state(layout, seed=7)
    data = ClassificationObjective().encode(engine.tokenizer, load_sst2("train", limit=200), 256)
    baseline = BaselineZoTrainer(BaselineConfig(opt_model_dir), layout, theta0, method)
    key = f"parity-{method_name}-{uuid.uuid4().hex[:6]}"
    num_slots = 2 * hyper.num_directions + (1 if method.conservative else 0)
    await engine.set_state(key, layout, theta0, (method_name, hyper_items(hyper)))
    engine_grads, baseline_grads, engine_coeffs, baseline_coeffs = [], [], [], []
    try:
        for step in range(NUM_STEPS):
            on_engine = await run_engine_step(
                engine, key, data, method, hyper.lr, job_seed=JOB_SEED, step=step, batch_size=BATCH_SIZE,
                slots=engine.slot_ids[:num_slots], salt=key,
            )
            on_baseline = baseline.step(data, hyper.lr, job_seed=JOB_SEED, step=step, batch_size=BATCH_SIZE)
            assert on_engine.batch == on_baseline.batch and on_engine.seeds == on_baseline.seeds
            assert on_engine.lr == on_baseline.lr, f"step {step}: the two sides took different branches"
            engine_grads += on_engine.projected_grads
            baseline_grads += on_baseline.projected_grads
            engine_coeffs += on_engine.coeffs  # for ZO-SGD-Cons the sign says which candidate was kept
            baseline_coeffs += on_baseline.coeffs
        engine_theta, engine_buffers = await engine.get_state(key)
    finally:
        await engine.drop_state(key)
    rms = _rms(baseline_grads)
    rel = _max_rel(engine_grads, baseline_grads)
    assert rms > 1e-3, "the run must produce real gradients for the comparison to mean anything"
    assert rel < 1e-3, f"{method_name}: projected gradients differ, max relative error {rel:.2e}"
    coeff_rel = _max_rel(engine_coeffs, baseline_coeffs)
    assert coeff_rel < 1e-3, f"{method_name}: update coefficients differ, max relative error {coeff_rel:.2e}"
    baseline_theta, baseline_buffers = baseline.state()
    assert _max_abs(engine_theta, theta0) > 1e-3, "θ must move over the run"
    theta_err = _max_abs(engine_theta, baseline_theta)
    assert theta_err < 1e-4, f"{method_name}: final θ differs by {theta_err:.2e}"
    assert engine_buffers.keys() == baseline_buffers.keys()
    buffer_err = _max_abs(engine_buffers, baseline_buffers)
    assert buffer_err < 1e-4, f"{method_name}: final optimiser buffers differ by {buffer_err:.2e}"
    print(f"{method_name}: grad rel {rel:.2e} (rms {rms:.3g}), coeff rel {coeff_rel:.2e}, θ {theta_err:.2e}, buffers {buffer_err:.2e}")
