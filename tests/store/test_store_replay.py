"""Replay is exact: materialising a version equals the live θ the step loop held at that step, bit for bit."""

from __future__ import annotations

from store_helpers import assert_theta_equal, create, mezo_applier, run_steps, small_layout


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
