"""Replay is exact: materialising a version equals the live θ the step loop held at that step, bit for bit."""

from __future__ import annotations

import dataclasses

import torch
from store_helpers import assert_theta_equal, clone, create, initial, mezo_applier, run_steps, small_layout, step_record

from adapters_store import AdapterState
from scheduler.zo.directions import stream_directions


async def test_materialise_equals_live_theta(make_store) -> None:
    store = make_store(snapshot_every=50, keep_snapshots=10)
    layout = small_layout()
    live = await create(store, "replay", layout)
    history = await run_steps(store, "replay", layout, live, num_steps=200)

    assert [s.version for s in await store.metadata.list_snapshots("replay")] == [0, 50, 100, 150, 200]
    apply = mezo_applier(layout)
    for version in (1, 37, 50, 51, 199, 200):
        state = await store.materialize("replay", version, apply)
        assert_theta_equal(state.theta, history[version])
    assert_theta_equal((await store.materialize("replay", "latest", apply)).theta, history[200])
    await store.check("replay")


async def test_replay_without_intermediate_snapshots(make_store) -> None:
    """With snapshots only at 0, version 37 is 37 records replayed from the initial state."""
    store = make_store(snapshot_every=10_000)
    layout = small_layout()
    live = await create(store, "long", layout)
    history = await run_steps(store, "long", layout, live, num_steps=37)
    state = await store.materialize("long", 37, mezo_applier(layout))
    assert_theta_equal(state.theta, history[37])


async def test_replay_carries_optimizer_state(make_store) -> None:
    """A stateful optimiser (heavy-ball momentum, buffers beside θ): snapshots hold the buffers, replay
    mutates them, and both θ and the buffers come back bit for bit."""
    layout = small_layout()

    def momentum_apply(theta, buffers, record) -> None:
        beta = record.hparam("momentum")
        for spec, zs in stream_directions(layout, record.seeds):
            grad = torch.zeros_like(theta[spec.name])  # [shape]
            for c, z in zip(record.coeffs, zs, strict=True):
                grad.add_(z, alpha=c)
            m = buffers.setdefault(f"momentum:{spec.name}", torch.zeros_like(grad))
            m.mul_(beta).add_(grad)
            theta[spec.name].add_(m, alpha=-record.lr)

    store = make_store(snapshot_every=4)
    start = initial(layout)
    await store.create_adapter("mmt", base_model="tiny", rank=4, alpha=8.0, target_modules=("q_proj", "v_proj"),
                               initial=start)
    live = AdapterState(clone(start.theta), {})
    history = {}
    for step in range(1, 11):
        record = dataclasses.replace(step_record(step, step - 1), hparams=(("momentum", 0.9),), weight_decay=0.0)
        momentum_apply(live.theta, live.optimizer_state, record)
        snapshot = AdapterState(clone(live.theta), clone(live.optimizer_state)) if store.snapshot_due(step) else None
        await store.commit("mmt", record, snapshot)
        history[step] = (clone(live.theta), clone(live.optimizer_state))
    for version in (3, 4, 7, 10):
        state = await store.materialize("mmt", version, momentum_apply)
        assert_theta_equal(state.theta, history[version][0])
        assert_theta_equal(state.optimizer_state, history[version][1])
