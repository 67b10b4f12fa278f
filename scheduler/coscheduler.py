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
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from scheduler.adapter_host import SlotPool
from scheduler.coscheduler_config import CoSchedulerConfig, CoSchedulerSnapshot
from scheduler.planning import (
    ChunkRequest,
    JobDemand,
    PlannerConfig,
    PlannerRecord,
    RoundObservation,
    StepGrant,
    initial_planner_state,
    plan_round,
    refund_step,
)
from scheduler.probe_cap_control import ProbeCapControl
from scheduler.slot_records import SlotRecords
from scheduler.user_latency import UserLatency, UserRequestHandle

log = logging.getLogger(__name__)


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
        self._slot_records = SlotRecords(slot_ids)
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
        self._wake = asyncio.Event()
        self.users = UserLatency(config.ttft_window_s, on_change=self._wake.set)
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.latest_record: PlannerRecord | None = None

    @property
    def initial_budget_tokens(self) -> int:
        return self._state.controller.budget_tokens

    def snapshot(self) -> CoSchedulerSnapshot:
        waiting, running = self.users.counts()
        return CoSchedulerSnapshot(
            num_probe_slots=sum(len(held) for _, held in self._in_flight.values()),
            num_steps_waiting=sum(1 for d in self._waiting.values() if not d.granted.done()),
            num_steps_in_flight=len(self._in_flight),
            num_user_waiting=waiting,
            num_user_running=running,
            ttft_p95_ms=self.users.recent_p95_ms(time.monotonic()),
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
        """A user request from arrival to its end; the handle's `first_token()` feeds the latency signal."""
        with self.users.track(num_prompt_tokens) as handle:
            yield handle

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
    def _observation(self) -> RoundObservation:
        now = time.monotonic()
        probe_owners = {slot: job_id for job_id, (_, held) in self._in_flight.items() for slot in held}
        slots, serving = self._slot_records.table(probe_owners, self._serving_slots(), set(self._pool.free_slots()), now)
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
            latency=self.users.signal(now),
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
