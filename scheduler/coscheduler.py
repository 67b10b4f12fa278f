"""The thin async loop that carries out the co-scheduling planner's rounds (`scheduler.planning`).

Jobs ask for each step (`async with coscheduler.step(...) as probe_slots`) and wait for a grant: the planner
admits steps under a token budget that an AIMD-style controller sizes from measured user time-to-first-token,
orders jobs by weighted fair queueing, and assigns free LoRA slots. User requests report their life
(`async with coscheduler.user_request(...)`), which is what the controller measures. The loop plans a round
whenever something changes, and otherwise every `round_interval_s`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from scheduler.adapter_host import SlotPool
from scheduler.planning import (
    ControllerConfig,
    JobDemand,
    LatencySignal,
    PlannerConfig,
    PlannerRecord,
    RoundObservation,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    initial_planner_state,
    percentile_ms,
    plan_round,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class CoSchedulerConfig:
    target_ttft_ms: float = 500.0
    max_tokens_in_flight: int = 8192
    # Rounds run when something changes (a first token, a step ends, a demand or user arrives or leaves);
    # this idle tick only lets stale latency samples age out. A faster timer would re-apply the same
    # p95 round after round and collapse the budget on old news.
    round_interval_s: float = 0.25
    ttft_window_s: float = 10.0


@dataclass(frozen=True)
class CoSchedulerSnapshot:
    num_probe_slots: int
    num_steps_waiting: int
    num_steps_in_flight: int
    num_user_waiting: int
    num_user_running: int
    ttft_p95_ms: float | None


@dataclass
class _Demand:
    job_id: str
    weight: float
    num_tokens: int
    num_slots: int
    is_paused: Callable[[], bool]
    granted: asyncio.Future = field(default_factory=lambda: asyncio.get_running_loop().create_future())


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
    ):
        """`serving_slots()` lists (slot id, owner key, requests in flight) of slots serving adapters;
        `reclaim_slot()` frees one slot held by an idle served adapter (False when there is none)."""
        self.config = config
        self._pool = pool
        self._slot_ids = slot_ids
        self._index = {slot: i for i, slot in enumerate(slot_ids)}
        self._serving_slots = serving_slots
        self._reclaim_slot = reclaim_slot
        self._planner_config = PlannerConfig(
            controller=ControllerConfig(target_ttft_ms=config.target_ttft_ms, max_tokens_in_flight=config.max_tokens_in_flight),
            num_slots=len(slot_ids),
        )
        self._state = initial_planner_state(self._planner_config)
        self._waiting: dict[str, _Demand] = {}
        self._in_flight: dict[str, tuple[_Demand, tuple[int, ...]]] = {}  # job → (its demand, its slots)
        self._users: set[int] = set()
        self._user_handles: dict[int, UserRequestHandle] = {}
        self._ttfts: deque[tuple[float, float]] = deque(maxlen=4096)  # (time, ms)
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
        self._wake.set()
        try:
            yield handle
        finally:
            self._user_handles.pop(key, None)
            self._wake.set()

    def _record_ttft(self, seconds: float) -> None:
        self._ttfts.append((time.monotonic(), seconds * 1000.0))
        self._wake.set()

    # ----------------------------------------------------------------- job side
    @asynccontextmanager
    async def step(
        self, job_id: str, weight: float, num_tokens: int, num_slots: int, is_paused: Callable[[], bool] = lambda: False
    ) -> AsyncIterator[tuple[int, ...]]:
        """Wait for the planner to grant this job's next step; yields the probe slots it may write."""
        # A step larger than the whole budget could never be admitted: count it as the maximum, so the
        # planner lets it run alone when nothing else is in flight.
        num_tokens = min(max(1, num_tokens), self.config.max_tokens_in_flight)
        demand = _Demand(job_id, weight, num_tokens, num_slots, is_paused)
        self._waiting[job_id] = demand
        self._wake.set()
        try:
            slots = await demand.granted
        finally:
            self._waiting.pop(job_id, None)
        self._in_flight[job_id] = (demand, slots)
        try:
            yield slots
        finally:
            self._in_flight.pop(job_id, None)
            await self._pool.give_back(slots)
            self._wake.set()

    def wake(self) -> None:
        self._wake.set()

    # ----------------------------------------------------------------- the loop
    def _observation(self) -> RoundObservation:
        now = time.monotonic()
        while self._ttfts and self._ttfts[0][0] < now - self.config.ttft_window_s:
            self._ttfts.popleft()
        handles = list(self._user_handles.values())
        waiting = sum(1 for h in handles if h.first_token_s is None)
        latency = LatencySignal(
            ttft_p95_ms=percentile_ms([ms for _, ms in self._ttfts], 0.95) if self._ttfts else None,
            num_user_running=len(handles) - waiting,
            num_user_waiting=waiting,
            num_user_tokens_in_flight=sum(h.num_prompt_tokens + h.num_output_tokens for h in handles),
        )
        probe = {slot: job_id for job_id, (_, held) in self._in_flight.items() for slot in held}
        serving = {slot: (owner, in_flight) for slot, owner, in_flight in self._serving_slots()}
        free = set(self._pool.free_slots())
        slots = []
        for slot in self._slot_ids:
            if slot in free:
                continue
            if slot in probe:
                slots.append(SlotOccupancy(self._index[slot], SlotKind.PROBE, probe[slot], 1, now))
            elif slot in serving:
                owner, in_flight = serving[slot]
                slots.append(SlotOccupancy(self._index[slot], SlotKind.SERVING, owner, in_flight, now))
            else:  # taken by the adapter host and not registered yet: never hand it out (one owner per slot)
                slots.append(SlotOccupancy(self._index[slot], SlotKind.SERVING, f"__reserved__#{slot}", 1, now))
        # Serving slots belong to the adapter host (it evicts idle adapters itself): pinned here.
        owners = sorted({s.owner for s in slots if s.kind is SlotKind.SERVING})
        demands = tuple(ServingDemand(owner, is_pinned=True) for owner in owners)
        jobs = [
            JobDemand(d.job_id, d.weight, d.num_tokens, d.num_slots, is_paused=d.is_paused())
            for d in self._waiting.values()
        ] + [
            JobDemand(job_id, d.weight, d.num_tokens, len(held), has_step_in_flight=True)
            for job_id, (d, held) in self._in_flight.items()
        ]
        return RoundObservation(
            now_s=now,
            latency=latency,
            num_probe_tokens_in_flight=sum(d.num_tokens for d, _ in self._in_flight.values()),
            jobs=tuple(jobs),
            slots=tuple(slots),
            serving_demands=demands,
        )

    def plan_once(self) -> bool:
        """Plan one round and hand out its grants; True if a waiting step is short of free slots."""
        plan = plan_round(self._planner_config, self._state, self._observation())
        self._state = plan.next_state
        self.latest_record = plan.record
        for grant in plan.step_grants:
            demand = self._waiting.get(grant.job_id)
            if demand is None or demand.granted.done():
                continue
            slots = tuple(self._slot_ids[i] for i in grant.probe_slot_ids)
            self._pool.take_specific(slots)  # same tick as the observation: nobody took them in between
            demand.granted.set_result(slots)
        waiting = [d for d in self._waiting.values() if not d.granted.done() and not d.is_paused()]
        return bool(waiting) and min(d.num_slots for d in waiting) > self._pool.num_free

    async def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                short_of_slots = bool(self._waiting) and self.plan_once()
                if short_of_slots and self._reclaim_slot is not None and await self._reclaim_slot():
                    continue
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a planning bug must fail the waiting steps loudly, not hang them
                log.exception("co-scheduler round failed")
                for demand in self._waiting.values():
                    if not demand.granted.done():
                        demand.granted.set_exception(RuntimeError(f"co-scheduler round failed: {exc!r}"))
            # asyncio.wait, not wait_for: on Python 3.11 wait_for can swallow a cancellation that races
            # with the inner wait finishing, and the loop would never stop.
            waiter = asyncio.ensure_future(self._wake.wait())
            try:
                await asyncio.wait({waiter}, timeout=self.config.round_interval_s)
            finally:
                waiter.cancel()
