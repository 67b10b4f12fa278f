"""Adapters on this engine: store versions ↔ worker master states ↔ serving slots.

- An adapter is loaded onto the worker from its store head (nearest snapshot + replayed records) when a job
  or a request needs it, and gets a serving double buffer. Idle served adapters are evicted LRU when slots
  are needed elsewhere.
- Every step commits a version record (and a snapshot when due) to the store, then the new version is
  published to the serving buffer for new requests.
- `name@version` requests get a slot holding exactly that version, shared by concurrent requests for it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

from adapters_store import AdapterNotFound, AdapterState, AdapterStore, HeadConflict, VersionRecord
from scheduler.direction_artifacts import MissingArtifact, artifact_hparam
from scheduler.engine.binding import EngineBinding
from scheduler.engine_step import StepOutcome
from scheduler.errors import AdapterNotServed, NoCapacity
from scheduler.replay import applier_for, record_hparams
from scheduler.serving import ServingLease, ServingTable
from scheduler.zo.lora_layout import LoraLayout, LoraShape, initial_state, layout_for_model_dir
from scheduler.zo.methods import hyper_items
from scheduler.zo.zo_step import ZoMethod


class SlotPool:
    """The engine's pinned LoRA slots not yet given a role."""

    def __init__(self, slot_ids: tuple[int, ...]):
        self._free = list(slot_ids)
        self.num_slots = len(slot_ids)
        self._changed = asyncio.Condition()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def free_slots(self) -> tuple[int, ...]:
        return tuple(self._free)

    def take_specific(self, slots: tuple[int, ...]) -> None:
        missing = [s for s in slots if s not in self._free]
        if missing:
            raise ValueError(f"slots {missing} are not free")
        self._free = [s for s in self._free if s not in slots]

    def take(self, count: int) -> tuple[int, ...] | None:
        if count > len(self._free):
            return None
        taken, self._free = tuple(self._free[:count]), self._free[count:]
        return taken

    async def give_back(self, slots: tuple[int, ...]) -> None:
        self._free.extend(slots)
        async with self._changed:
            self._changed.notify_all()

    async def wait_change(self) -> None:
        async with self._changed:
            await self._changed.wait()


@dataclass
class LoadedAdapter:
    name: str
    layout: LoraLayout
    head: int  # the version the worker's master state holds
    last_used: float = field(default_factory=time.monotonic)
    training: bool = False
    method_wire: tuple | None = None  # what the worker trains with: (name, hyper items[, artifacts blob])
    artifact_id: str | None = None  # the store id of that artifacts blob, named in every record committed


@dataclass
class PendingCommit:
    """A scored step whose update the worker has been sent (`AdapterHost.start_commit`)."""

    outcome: StepOutcome
    task: asyncio.Task[bool]  # True: committed as the adapter's head; False: the head had moved on (reloaded)
    sent_s: float  # perf_counter() when the update was sent


@dataclass
class _VersionSlot:
    slot: int
    users: int = 0
    last_used: float = field(default_factory=time.monotonic)


class AdapterHost:
    def __init__(self, binding: EngineBinding, store: AdapterStore, slots: SlotPool):
        self.binding = binding
        self.store = store
        self.slots = slots
        self.serving = ServingTable()
        self.loaded: dict[str, LoadedAdapter] = {}
        self._version_slots: dict[tuple[str, int], _VersionSlot] = {}
        self._layouts: dict[LoraShape, LoraLayout] = {}
        self._lock = asyncio.Lock()  # loading, eviction and version-slot assignment
        self._artifacts: dict[str, bytes] = {}  # artifact id → blob, read from the store on first use

    # ----------------------------------------------------------------- layouts and replay
    async def layout(self, shape: LoraShape) -> LoraLayout:
        if shape not in self._layouts:
            self._layouts[shape] = await asyncio.to_thread(layout_for_model_dir, self.binding.config.model, shape)
        return self._layouts[shape]

    async def layout_of(self, name: str) -> LoraLayout:
        meta = await self.store.get_adapter(name)
        return await self.layout(LoraShape(meta.rank, meta.alpha, tuple(sorted(meta.target_modules))))

    async def materialize(self, name: str, version: int | str | None) -> AdapterState:
        return await self._replaying(name, lambda apply: self.store.materialize(name, version, apply))

    async def _replaying(self, name: str, run):
        """`run(apply_record)`, fetching from the store each artifact a replayed record names."""
        layout = await self.layout_of(name)
        while True:
            try:
                return await run(applier_for(layout, self._artifacts))
            except MissingArtifact as missing:
                self._artifacts[missing.artifact_id] = await self.store.get_artifact(missing.artifact_id)

    # ----------------------------------------------------------------- loading
    async def create_if_missing(self, name: str, shape: LoraShape, seed: int) -> None:
        try:
            await self.store.get_adapter(name)
        except AdapterNotFound:
            layout = await self.layout(shape)
            await self.store.create_adapter(
                name,
                base_model=self.binding.config.model,
                rank=shape.rank,
                alpha=shape.alpha,
                target_modules=tuple(shape.target_modules),
                initial=AdapterState(initial_state(layout, seed), {}),
            )

    async def load(self, name: str, method_wire: tuple | None = None) -> LoadedAdapter:
        """Put the store head of `name` on the worker (with a training method if given) and serve it."""
        async with self._lock:
            layout = await self.layout_of(name)
            state = await self.materialize(name, "latest")
            head = await self.store.resolve(name, "latest")
            adapter = self.loaded.get(name)
            if adapter is None:
                buffers = await self.take_slots(2)
                meta = await self.store.get_adapter(name)
                # A deleted and re-created adapter restarts its version numbers: the creation time keeps
                # its cache salts distinct from the old incarnation's.
                self.serving.register(name, buffers, incarnation=f"{meta.created_at:.6f}")
                adapter = self.loaded[name] = LoadedAdapter(name, layout, head)
            artifact_id = None
            if method_wire is not None and len(method_wire) > 2 and method_wire[2]:
                artifact_id = await self.store.put_artifact(method_wire[2])
                self._artifacts[artifact_id] = method_wire[2]
            await self.binding.set_state(name, layout, state.theta, method_wire, state.optimizer_state)
            adapter.head = head
            adapter.training = method_wire is not None
            adapter.method_wire, adapter.artifact_id = method_wire, artifact_id
            adapter.last_used = time.monotonic()
        await self.publish_when_idle(adapter)
        return adapter

    async def take_slots(self, count: int) -> tuple[int, ...]:
        """Free slots, evicting idle served adapters and idle version slots (least recently used first)."""
        while (slots := self.slots.take(count)) is None:
            if not await self._evict_one():
                raise NoCapacity(f"no {count} free LoRA slots: every slot is in use")
        return slots

    async def reclaim_slot(self) -> bool:
        """Free the least recently used idle serving slot(s), for probes short of slots."""
        async with self._lock:
            return await self._evict_one()

    async def _evict_one(self) -> bool:
        idle_versions = [(v.last_used, key) for key, v in self._version_slots.items() if v.users == 0]
        idle_adapters = [
            (a.last_used, a.name) for a in self.loaded.values() if not a.training and self.serving.inflight(a.name) == 0
        ]
        candidates = sorted([(t, "version", k) for t, k in idle_versions] + [(t, "adapter", k) for t, k in idle_adapters])
        if not candidates:
            return False
        _, kind, key = candidates[0]
        if kind == "version":
            await self.slots.give_back((self._version_slots.pop(key).slot,))
        else:
            self.loaded.pop(key)
            await self.binding.drop_state(key)
            await self.slots.give_back(self.serving.unregister(key))
        return True

    def serving_slots(self) -> list[tuple[int, str, int]]:
        """(slot, owner key, requests in flight) of every slot serving an adapter or a pinned version."""
        rows = []
        for name in self.loaded:  # the two buffers of a double buffer are distinct residents
            rows += [(slot, f"{name}#buffer{i}", n) for i, (slot, n) in enumerate(self.serving.slot_usage(name))]
        rows += [(entry.slot, f"{name}@{version}", entry.users) for (name, version), entry in self._version_slots.items()]
        return rows

    async def release_training(self, name: str) -> None:
        adapter = self.loaded.get(name)
        if adapter is not None:
            adapter.training = False

    # ----------------------------------------------------------------- stepping
    async def apply_and_commit(self, adapter: LoadedAdapter, outcome: StepOutcome, method: ZoMethod, hyper) -> int:
        """Apply a scored step to the worker's state, commit the new version and publish it; the version served."""
        await (await self.start_commit(adapter, outcome, method, hyper)).task
        return adapter.head

    async def start_commit(
        self, adapter: LoadedAdapter, outcome: StepOutcome, method: ZoMethod, hyper
    ) -> PendingCommit:
        """Send a scored step's update to the worker and return once it is on its way; the store commit and the
        publish go on in the returned task.

        The engine core runs this process's calls in the order they were sent, so anything sent after this
        returns (the next step's probe writes) sees the updated state: a job scores its next step while this
        one is committed. The stepped state goes into the idle serving buffer in the same engine call gap as
        the update, so publishing waits for no engine step of its own. That buffer is served only once the
        version is committed; on a head conflict the store head is reloaded and published instead.
        """
        sent_s = time.perf_counter()
        target = self.serving.publish_target(adapter.name)
        update = asyncio.ensure_future(
            self.binding.apply_step(adapter.name, outcome.step, outcome.seeds, outcome.coeffs, outcome.lr)
        )
        write = asyncio.ensure_future(self.binding.write_state(adapter.name, target)) if target is not None else None
        # Each call's task runs up to its first wait, which vLLM's client reaches only after sending the call;
        # the tasks run in the order they were created, the update first.
        await asyncio.sleep(0)
        committing = self._finish_commit(adapter, outcome, method, hyper, target, update, write)
        return PendingCommit(outcome, asyncio.ensure_future(committing), sent_s)

    async def _finish_commit(
        self, adapter: LoadedAdapter, outcome: StepOutcome, method: ZoMethod, hyper, target: int | None,
        update: asyncio.Future, write: asyncio.Future | None,
    ) -> bool:
        # A failed buffer write must not cost the update its commit.
        calls = [update] if write is None else [update, write]
        applied, *written = await asyncio.gather(*calls, return_exceptions=True)
        if isinstance(applied, BaseException):
            raise applied
        committed = await self._commit(adapter, outcome, method, hyper)
        if written and isinstance(written[0], BaseException):
            raise written[0]
        if committed and target is not None:
            self.serving.mark_published(adapter.name, target, adapter.head)
        elif committed:  # the idle buffer still had requests in flight: publish when it can be written
            await self.publish(adapter)
        return committed

    async def commit_step(self, adapter: LoadedAdapter, outcome: StepOutcome, method: ZoMethod, hyper) -> int:
        """Commit the version the worker now holds; on a head conflict reload the store head instead."""
        await self._commit(adapter, outcome, method, hyper)
        return adapter.head

    async def _commit(self, adapter: LoadedAdapter, outcome: StepOutcome, method: ZoMethod, hyper) -> bool:
        """Commit the version the worker holds after `outcome`; False when the store's head had moved on (the
        store head is then loaded and published)."""
        version = adapter.head + 1
        record = VersionRecord(
            version=version,
            parent=adapter.head,
            step=outcome.step,
            optimizer=method.name,
            seeds=tuple(outcome.seeds),
            coeffs=tuple(outcome.coeffs),
            lr=outcome.lr,
            weight_decay=method.weight_decay,
            eps=method.eps,
            hparams=record_hparams(hyper) + ((artifact_hparam(adapter.artifact_id),) if adapter.artifact_id else ()),
            batch_id=outcome.step,
        )
        state = None
        if self.store.snapshot_due(version):
            theta, buffers = await self.binding.get_state(adapter.name)
            state = AdapterState(theta, buffers)
        try:
            await self.store.commit(adapter.name, record, state)
        except HeadConflict:
            await self.load(adapter.name, adapter.method_wire or (method.name, hyper_items(hyper)))
            return False
        adapter.head = version
        adapter.last_used = time.monotonic()
        return True

    async def snapshot_head(self, adapter: LoadedAdapter) -> None:
        theta, buffers = await self.binding.get_state(adapter.name)
        await self.store.snapshot(adapter.name, adapter.head, AdapterState(theta, buffers))
        await self.store.apply_retention(adapter.name)

    async def publish(self, adapter: LoadedAdapter) -> bool:
        slot = self.serving.publish_target(adapter.name)
        if slot is None:
            return False
        await self.binding.write_state(adapter.name, slot)
        self.serving.mark_published(adapter.name, slot, adapter.head)
        return True

    async def publish_when_idle(self, adapter: LoadedAdapter, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.serving.live_version(adapter.name) != adapter.head and time.monotonic() < deadline:
            if not await self.publish(adapter):
                # A release that lands between the check and the wait is caught by the timeout.
                waiter = asyncio.ensure_future(self.serving.wait_release(adapter.name))
                try:
                    await asyncio.wait({waiter}, timeout=0.2)
                finally:
                    waiter.cancel()

    # ----------------------------------------------------------------- serving
    @asynccontextmanager
    async def lease(self, name: str, version: int | None = None) -> AsyncIterator[ServingLease]:
        """A slot holding `name` at its live version (version None) or exactly at `version`."""
        if version is None:
            if name not in self.loaded:
                try:
                    await self.load(name)
                except AdapterNotFound as exc:
                    raise AdapterNotServed(name) from exc
            self.loaded[name].last_used = time.monotonic()
            lease = self.serving.acquire(name)
            try:
                yield lease
            finally:
                self.serving.release(lease)
            return
        entry = await self._version_slot(name, version)
        entry.users += 1
        meta = await self.store.get_adapter(name)
        try:
            yield ServingLease(name, entry.slot, version, f"{meta.created_at:.6f}")
        finally:
            entry.users -= 1
            entry.last_used = time.monotonic()

    async def _version_slot(self, name: str, version: int) -> _VersionSlot:
        async with self._lock:
            entry = self._version_slots.get((name, version))
            if entry is not None:
                return entry
            state = await self.materialize(name, version)  # VersionNotFound for a bad version
            layout = await self.layout_of(name)
            (slot,) = await self.take_slots(1)
            key = f"{name}@{version}"
            try:
                await self.binding.set_state(key, layout, state.theta)
                await self.binding.write_state(key, slot)
            finally:
                await self.binding.drop_state(key)
            entry = self._version_slots[(name, version)] = _VersionSlot(slot)
            return entry

    async def export(self, name: str, version: int | str | None, out_dir: Path) -> Path:
        return await self._replaying(name, lambda apply: self.store.export_peft(name, version, out_dir, apply))

    async def rollback(self, name: str, version: int) -> int:
        commit = await self._replaying(name, lambda apply: self.store.rollback(name, version, apply))
        if name in self.loaded and not self.loaded[name].training:
            await self.load(name)
        return commit.record.version
