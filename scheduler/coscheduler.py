"""The thin async loop that carries out the co-scheduling planner's rounds (`scheduler.planning`).

Jobs ask for each step (`async with coscheduler.step(...) as lease`) and wait for a grant: the planner grants
steps in weighted fair order (each job within its share) and assigns free LoRA slots. A granted step then
submits its scoring sequences in chunks through `lease.gate`: each chunk waits until the token budget has
room, so the budget, which an AIMD-style controller sizes from measured user time-to-first-token, bounds how
much probe work any engine forward holds. User requests report their life (`async with
coscheduler.user_request(...)`), which is what the controller measures. The loop plans a round whenever
something changes (a chunk returns, a step ends, a user arrives or gets a first token), and otherwise every
`round_interval_s` so that stale latency samples age out.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from scheduler.adapter_host import SlotPool
from scheduler.coscheduler_config import CoSchedulerConfig, CoSchedulerSnapshot
from scheduler.probe_cap_control import ProbeCapControl
from scheduler.planning import (
    ChunkRequest,
    JobDemand,
    LatencySignal,
    PlannerConfig,
    PlannerRecord,
    RoundObservation,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    StepGrant,
    initial_planner_state,
    percentile_ms,
    plan_round,
    refund_step,
)

log = logging.getLogger(__name__)
_RECORD_CACHE_SIZE = 1024  # slot and serving records kept for reuse across rounds


@dataclass
class _Demand:
    job_id: str
    weight: float
    num_tokens: int
    num_slots: int
    is_paused: Callable[[], bool]
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


@dataclass
class _Chunk:
    request: ChunkRequest
    admitted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


class TokenGate:
    """A granted step's way into the engine: `async with gate.admit(n)` around submitting n tokens."""

    def __init__(self, owner: CoScheduler, job_id: str):
        self._owner = owner
        self.job_id = job_id
        self.chunk_tokens = owner.config.chunk_tokens

    @asynccontextmanager
    async def admit(self, num_tokens: int) -> AsyncIterator[None]:
        owner = self._owner
        chunk = _Chunk(ChunkRequest(next(owner._chunk_ids), self.job_id, max(1, num_tokens)))
        owner._chunks_waiting[chunk.request.request_id] = chunk
        owner._wake.set()
        try:
            await chunk.admitted
        except BaseException:
            owner._chunks_waiting.pop(chunk.request.request_id, None)
            if chunk.admitted.done() and not chunk.admitted.cancelled():
                owner._chunks_in_flight.pop(chunk.request.request_id, None)
            owner._wake.set()
            raise
        try:
            yield
        finally:
            owner._chunks_in_flight.pop(chunk.request.request_id, None)
            owner._wake.set()


@dataclass(frozen=True)
class StepLease:
    slot_ids: tuple[int, ...]
    gate: TokenGate


@dataclass
class UserRequestHandle:
    num_prompt_tokens: int
    started_s: float = field(default_factory=time.monotonic)
    first_token_s: float | None = None
    num_output_tokens: int = 0
    _owner: CoScheduler | None = None

    def first_token(self) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.monotonic()
            if self._owner is not None:
                self._owner._record_ttft(self.first_token_s - self.started_s)

    def add_output_tokens(self, count: int) -> None:
        self.num_output_tokens += count

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_token_s is None else self.first_token_s - self.started_s


class CoScheduler:
    def __init__(
        self,
        config: CoSchedulerConfig,
        pool: SlotPool,
        slot_ids: tuple[int, ...],
        serving_slots: Callable[[], list[tuple[int, str, int]]],
        reclaim_slot: Callable[[], Awaitable[bool]] | None = None,
        probe_cap: ProbeCapControl | None = None,
    ):
        """`serving_slots()` lists (slot id, owner key, requests in flight) of slots serving adapters;
        `reclaim_slot()` frees one slot held by an idle served adapter (False when there is none);
        `probe_cap` drives the engine's per-step probe cap from the same latency signal every round."""
        self.config = config
        self._pool = pool
        self._slot_ids = slot_ids
        self._index = {slot: i for i, slot in enumerate(slot_ids)}
        self._serving_slots = serving_slots
        self._reclaim_slot = reclaim_slot
        self.probe_cap = probe_cap
        self._planner_config = PlannerConfig(
            controller=config.controller(),
            num_slots=len(slot_ids),
            fairness_max_lead=config.fairness_max_lead_tokens,
            hold_chunks_while_users_wait=config.hold_chunks_while_users_wait,
        )
        self._state = initial_planner_state(self._planner_config)
        self._waiting: dict[str, _Demand] = {}
        self._in_flight: dict[str, tuple[_Demand, tuple[int, ...]]] = {}  # job → (its demand, its slots)
        self._idle: dict[str, tuple[_Demand, float]] = {}  # job between steps → (its last demand, since when)
        self._chunk_ids = itertools.count()
        self._chunks_waiting: dict[int, _Chunk] = {}  # insertion order = FIFO
        self._chunks_in_flight: dict[int, int] = {}  # request id → tokens
        self._user_handles: dict[int, UserRequestHandle] = {}
        self._last_user_arrival_s: float | None = None
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=4096)  # (time, ms)
        # A round runs at every event (hundreds a second with users and jobs): what has not changed since the
        # last round is reused rather than rebuilt.
        self._ttft_changes = 0  # samples added or aged out so far
        self._ttft_p95: tuple[int, float | None] = (-1, None)  # (_ttft_changes when computed, p95 ms)
        self._occupancy: dict[tuple, SlotOccupancy] = {}  # (slot, kind, owner, in flight) → its record
        self._serving_demands: dict[str, ServingDemand] = {}
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.latest_record: PlannerRecord | None = None

    @property
    def initial_budget_tokens(self) -> int:
        return self._state.controller.budget_tokens

    def snapshot(self) -> CoSchedulerSnapshot:
        handles = list(self._user_handles.values())
        waiting = sum(1 for h in handles if h.first_token_s is None)
        recent = [ms for t, ms in self._ttfts if t >= time.monotonic() - self.config.ttft_window_s]
        return CoSchedulerSnapshot(
            num_probe_slots=sum(len(held) for _, held in self._in_flight.values()),
            num_steps_waiting=sum(1 for d in self._waiting.values() if not d.granted.done()),
            num_steps_in_flight=len(self._in_flight),
            num_user_waiting=waiting,
            num_user_running=len(handles) - waiting,
            ttft_p95_ms=percentile_ms(recent, 0.95) if recent else None,
            num_probe_tokens_in_flight=sum(self._chunks_in_flight.values()),
            num_chunks_waiting=len(self._chunks_waiting),
        )

    # ----------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="zo-coscheduler")

    async def stop(self) -> None:
        self._stopping = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    # ----------------------------------------------------------------- user side
    @asynccontextmanager
    async def user_request(self, num_prompt_tokens: int) -> AsyncIterator[UserRequestHandle]:
        handle = UserRequestHandle(num_prompt_tokens, _owner=self)
        key = id(handle)
        self._user_handles[key] = handle
        self._last_user_arrival_s = handle.started_s
        self._wake.set()
        try:
            yield handle
        finally:
            self._user_handles.pop(key, None)
            self._wake.set()

    def _record_ttft(self, seconds: float) -> None:
        self._ttfts.append((time.monotonic(), seconds * 1000.0))
        self._ttft_changes += 1
        self._wake.set()

    # ----------------------------------------------------------------- job side
    @asynccontextmanager
    async def step(
        self, job_id: str, weight: float, num_tokens: int, num_slots: int, is_paused: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[StepLease]:
        """Wait for the planner to grant this job's next step; yields its probe slots and token gate."""
        demand = _Demand(job_id, weight, max(1, num_tokens), num_slots, is_paused)
        self._idle.pop(job_id, None)
        self._waiting[job_id] = demand
        self._wake.set()
        try:
            slots = await demand.granted
        except BaseException:
            granted = demand.granted
            if granted.done() and not granted.cancelled() and granted.exception() is None:
                # Cancelled in the tick after the grant: its slots were taken and its tokens charged for us.
                await self._pool.give_back(granted.result())
                grant = StepGrant(job_id, demand.num_tokens, ())
                self._state = refund_step(self._state, grant, demand.weight)
                self._wake.set()
            raise
        finally:
            self._waiting.pop(job_id, None)
        self._in_flight[job_id] = (demand, slots)
        try:
            yield StepLease(slots, TokenGate(self, job_id))
        finally:
            self._in_flight.pop(job_id, None)
            self._idle[job_id] = (demand, time.monotonic())
            await self._pool.give_back(slots)
            self._wake.set()

    def set_target_ttft_ms(self, target_ttft_ms: float) -> None:
        """Move the user-latency target while running (an operator's SLO change); the budget adapts from here."""
        self.config = dataclasses.replace(self.config, target_ttft_ms=target_ttft_ms)
        controller = self.config.controller()  # validates the new target
        self._planner_config = dataclasses.replace(self._planner_config, controller=controller)
        self._state = dataclasses.replace(
            self._state, controller=dataclasses.replace(self._state.controller, target_ttft_ms=target_ttft_ms)
        )
        if self.probe_cap is not None:
            self.probe_cap.set_target_ttft_ms(target_ttft_ms)
        self._wake.set()

    def forget_job(self, job_id: str) -> None:
        """The job ended: it no longer counts for fairness."""
        self._idle.pop(job_id, None)
        self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # ----------------------------------------------------------------- the loop
    def _latency(self, now: float) -> LatencySignal:
        while self._ttfts and self._ttfts[0][0] < now - self.config.ttft_window_s:
            self._ttfts.popleft()
            self._ttft_changes += 1
        if self._ttft_p95[0] != self._ttft_changes:
            p95 = percentile_ms([ms for _, ms in self._ttfts], 0.95) if self._ttfts else None
            self._ttft_p95 = (self._ttft_changes, p95)
        handles = list(self._user_handles.values())
        waiting = [h for h in handles if h.first_token_s is None]
        return LatencySignal(
            ttft_p95_ms=self._ttft_p95[1],
            num_user_running=len(handles) - len(waiting),
            num_user_waiting=len(waiting),
            num_user_tokens_in_flight=sum(h.num_prompt_tokens + h.num_output_tokens for h in handles),
            seconds_since_user_arrival_s=(
                None if self._last_user_arrival_s is None else max(0.0, now - self._last_user_arrival_s)
            ),
            max_user_wait_ms=max(((now - h.started_s) * 1000.0 for h in waiting), default=0.0),
        )

    def _slot_table(self, now: float) -> tuple[tuple[SlotOccupancy, ...], tuple[ServingDemand, ...]]:
        probe = {slot: job_id for job_id, (_, held) in self._in_flight.items() for slot in held}
        serving = {slot: (owner, in_flight) for slot, owner, in_flight in self._serving_slots()}
        free = set(self._pool.free_slots())
        slots = []
        for slot in self._slot_ids:
            if slot in free:
                continue
            if slot in probe:
                slots.append(self._occupied(slot, SlotKind.PROBE, probe[slot], 1, now))
            elif slot in serving:
                owner, in_flight = serving[slot]
                slots.append(self._occupied(slot, SlotKind.SERVING, owner, in_flight, now))
            else:  # taken by the adapter host and not registered yet: never hand it out (one owner per slot)
                slots.append(self._occupied(slot, SlotKind.SERVING, f"__reserved__#{slot}", 1, now))
        # Serving slots belong to the adapter host (it evicts idle adapters itself): pinned here.
        owners = sorted({s.owner for s in slots if s.kind is SlotKind.SERVING})
        return tuple(slots), tuple(self._pinned_demand(owner) for owner in owners)

    def _occupied(self, slot: int, kind: SlotKind, owner: str, in_flight: int, now: float) -> SlotOccupancy:
        """The slot's record: an earlier round's while its owner and requests in flight are the same. Its
        `last_used_s` is when that state was first seen; no LRU order reads it here (every serving slot is
        pinned for the planner, and probe slots are never evicted by age)."""
        key = (slot, kind, owner, in_flight)
        record = self._occupancy.get(key)
        if record is None:
            if len(self._occupancy) >= _RECORD_CACHE_SIZE:
                self._occupancy.clear()
            record = self._occupancy[key] = SlotOccupancy(self._index[slot], kind, owner, in_flight, now)
        return record

    def _pinned_demand(self, owner: str) -> ServingDemand:
        demand = self._serving_demands.get(owner)
        if demand is None:
            if len(self._serving_demands) >= _RECORD_CACHE_SIZE:
                self._serving_demands.clear()
            demand = self._serving_demands[owner] = ServingDemand(owner, is_pinned=True)
        return demand

    def _observation(self) -> RoundObservation:
        now = time.monotonic()
        slots, serving = self._slot_table(now)
        jobs = [
            JobDemand(d.job_id, d.weight, d.num_tokens, d.num_slots, is_paused=d.is_paused())
            for d in self._waiting.values()
        ] + [
            JobDemand(job_id, d.weight, d.num_tokens, len(held), has_step_in_flight=True)
            for job_id, (d, held) in self._in_flight.items()
        ] + [
            JobDemand(
                job_id, d.weight, d.num_tokens, d.num_slots, is_paused=d.is_paused(), wants_step=False,
                idle_s=max(0.0, now - since),
            )
            for job_id, (d, since) in self._idle.items()
            if job_id not in self._waiting and job_id not in self._in_flight
        ]
        return RoundObservation(
            now_s=now,
            latency=self._latency(now),
            num_probe_tokens_in_flight=sum(self._chunks_in_flight.values()),
            jobs=tuple(jobs),
            slots=slots,
            serving_demands=serving,
            chunk_requests=tuple(chunk.request for chunk in self._chunks_waiting.values()),
        )

    def plan_once(self) -> bool:
        """Plan one round and hand out its grants; True if a waiting step is short of free slots."""
        observation = self._observation()
        plan = plan_round(self._planner_config, self._state, observation)
        if self.probe_cap is not None:
            in_flight = observation.num_probe_tokens_in_flight
            queued = sum(request.num_tokens for request in observation.chunk_requests)
            self.probe_cap.update(observation.latency, in_flight, in_flight + queued, observation.now_s)
        self._state = plan.next_state
        self.latest_record = plan.record
        for grant in plan.step_grants:
            demand = self._waiting.get(grant.job_id)
            if demand is None or demand.granted.done():
                continue
            slots = tuple(self._slot_ids[i] for i in grant.probe_slot_ids)
            self._pool.take_specific(slots)  # same tick as the observation: nobody took them in between
            demand.granted.set_result(slots)
        for request in plan.chunk_grants:
            chunk = self._chunks_waiting.pop(request.request_id, None)
            if chunk is None or chunk.admitted.done():
                continue
            self._chunks_in_flight[request.request_id] = request.num_tokens
            chunk.admitted.set_result(None)
        waiting = [d for d in self._waiting.values() if not d.granted.done() and not d.is_paused()]
        return bool(waiting) and min(d.num_slots for d in waiting) > self._pool.num_free

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                busy = bool(self._waiting) or bool(self._chunks_waiting)
                short_of_slots = busy and self.plan_once()
                if short_of_slots and self._reclaim_slot is not None and await self._reclaim_slot():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a planning bug must fail the waiting steps loudly, not hang them
                log.exception("co-scheduler round failed")
                error = RuntimeError(f"co-scheduler round failed: {exc!r}")
                for demand in self._waiting.values():
                    if not demand.granted.done():
                        demand.granted.set_exception(error)
                for chunk in list(self._chunks_waiting.values()):
                    if not chunk.admitted.done():
                        chunk.admitted.set_exception(error)
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation that races
            # with the inner wait finishing, and the loop would never stop.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.config.round_interval_s)
            finally:
                waiter.cancel()
