"""Shared test helpers: a small LoRA layout, the MeZO applier (what the scheduler will inject), and a
deterministic trajectory so a test can recompute any version's θ independently of the store."""

from __future__ import annotations

import torch

from adapters_store import AdapterState, AdapterStore, ApplyRecord, VersionRecord
from scheduler.zo import mezo
from scheduler.zo.directions import derive_seeds
from scheduler.zo.lora_layout import LoraLayout, LoraShape, initial_state, layout_for_linears

JOB_SEED = 1234
NUM_DIRECTIONS = 2


def small_layout() -> LoraLayout:
    linears = {
        "model.decoder.layers.0.self_attn.q_proj": (16, 16),
        "model.decoder.layers.0.self_attn.v_proj": (16, 16),
        "model.decoder.layers.1.self_attn.q_proj": (16, 16),
        "model.decoder.layers.1.self_attn.v_proj": (16, 16),
    }
    return layout_for_linears(linears, LoraShape(4, 8.0, ("q_proj", "v_proj")))


def mezo_applier(layout: LoraLayout) -> ApplyRecord:
    def apply(theta: dict[str, torch.Tensor], optimizer_state: dict[str, torch.Tensor], record: VersionRecord) -> None:
        mezo.apply_update(theta, layout, record.seeds, record.coeffs, record.lr, record.weight_decay)

    return apply


def step_record(step: int, parent: int) -> VersionRecord:
    """The record of a fabricated but deterministic MeZO step (coefficients as if from real losses)."""
    gen = torch.Generator().manual_seed(step)
    coeffs = tuple(float(c) for c in torch.randn(NUM_DIRECTIONS, generator=gen, dtype=torch.float64))
    return VersionRecord(
        version=parent + 1,
        parent=parent,
        step=step,
        optimizer="mezo-sgd",
        seeds=tuple(derive_seeds(JOB_SEED, step, NUM_DIRECTIONS)),
        coeffs=coeffs,
        lr=1e-2,
        weight_decay=1e-3 if step % 3 == 0 else 0.0,
        eps=1e-3,
        batch_id=step * 16,
    )


def initial(layout: LoraLayout) -> AdapterState:
    return AdapterState(initial_state(layout, seed=7))


def clone(theta: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in theta.items()}


def assert_theta_equal(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


async def create(store: AdapterStore, name: str, layout: LoraLayout) -> dict[str, torch.Tensor]:
    """Create `name` at version 0; returns a live θ (a private copy) at version 0."""
    start = initial(layout)
    await store.create_adapter(
        name, base_model="tiny", rank=layout.shape.rank, alpha=layout.shape.alpha,
        target_modules=layout.shape.target_modules, initial=start,
    )
    return clone(start.theta)


async def run_steps(
    store: AdapterStore, name: str, layout: LoraLayout, live: dict[str, torch.Tensor], num_steps: int
) -> dict[int, dict[str, torch.Tensor]]:
    """Step the live θ and commit each step like the step loop will; returns θ after each new version."""
    apply = mezo_applier(layout)
    head = (await store.get_adapter(name)).head
    history = {}
    for _ in range(num_steps):
        record = step_record(step=head + 1, parent=head)
        apply(live, {}, record)
        state = AdapterState(clone(live)) if store.snapshot_due(record.version) else None
        await store.commit(name, record, state)
        head = record.version
        history[head] = clone(live)
    return history
