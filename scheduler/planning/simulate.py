"""A synthetic engine to drive the planner without vLLM: for tests now, for the benchmark later.

The model is deliberately crude but has the property that matters: probes in flight slow users down.
Each round the engine prefills `num_tokens_per_round` tokens, shared between user prompts and probe
sequences in proportion to their backlogs (chunked prefill batches both; priority only orders the waiting
queue, it does not shrink running probes). Users are served first-come first-served among themselves; a user
whose prompt finishes gets a TTFT sample and then decodes for `num_decode_rounds` rounds (one token each).
A granted step queues its tokens as chunks of `num_chunk_tokens`; admitted chunks are processed in
proportion to their size, and a step is done when all its chunks are.

Deterministic: the same inputs give the same trace. Pure: no clock, no threads, no I/O.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.planning.controller import percentile_ms
from scheduler.planning.planner import PlannerConfig, RoundObservation, initial_planner_state, plan_round
from scheduler.planning.records import (
    ChunkRequest,
    JobDemand,
    LatencySignal,
    PlannerRecord,
    ServingDemand,
    SlotKind,
    SlotOccupancy,
    require,
    require_count,
)


@dataclass(frozen=True)
class SyntheticEngine:
    num_tokens_per_round: int = 4096
    round_ms: float = 50.0
    base_ttft_ms: float = 20.0  # scheduling + first decode, paid even on an idle engine
    num_user_prompt_tokens: int = 256
    num_decode_rounds: int = 4
    ttft_window_rounds: int = 10  # the service's sliding window for p95
    num_chunk_tokens: int = 256


@dataclass(frozen=True)
class SimJob:
    job_id: str
    weight: float
    num_step_tokens: int
    num_probe_slots: int
    paused_rounds: tuple[int, int] | None = None  # [start, end) rounds during which the job is paused


@dataclass(frozen=True)
class SimResult:
    records: tuple[PlannerRecord, ...]
    user_ttft_ms_by_round: tuple[tuple[float, ...], ...]  # TTFT samples of users whose prompt finished that round
    tokens_scored_by_job: tuple[tuple[str, int], ...]  # scoring tokens the engine actually processed
    max_slots_in_use: int


@dataclass
class _User:  # mutable simulation internals never leave this module
    arrival_round: int
    num_prompt_left: int
    num_decode_left: int


@dataclass
class _Chunk:
    request_id: int
    job_id: str
    num_tokens: int
    num_tokens_left: float = 0.0
    is_admitted: bool = False


@dataclass
class _Step:
    job_id: str
    slot_ids: tuple[int, ...]
    chunks: list[_Chunk]


@dataclass
class _World:
    users: list[_User] = field(default_factory=list)
    steps: dict[str, _Step] = field(default_factory=dict)
    ttft_samples: list[tuple[int, float]] = field(default_factory=list)
    scored: dict[str, float] = field(default_factory=dict)
    last_arrival_round: int | None = None
    next_chunk_id: int = 0

    def new_chunks(self, job_id: str, num_tokens: int, chunk_tokens: int) -> list[_Chunk]:
        chunks = []
        while num_tokens > 0:
            size = min(chunk_tokens, num_tokens)
            chunks.append(_Chunk(self.next_chunk_id, job_id, size, float(size)))
            self.next_chunk_id += 1
            num_tokens -= size
        return chunks


def _is_paused(job: SimJob, round_index: int) -> bool:
    return job.paused_rounds is not None and job.paused_rounds[0] <= round_index < job.paused_rounds[1]


def _observe(engine: SyntheticEngine, world: _World, jobs: Sequence[SimJob], round_index: int) -> RoundObservation:
    recent = [ttft for done_round, ttft in world.ttft_samples if done_round > round_index - engine.ttft_window_rounds]
    prefilling = [user for user in world.users if user.num_prompt_left > 0]
    waiting = [user for user in prefilling if user.num_prompt_left == engine.num_user_prompt_tokens]
    user_tokens = sum(user.num_prompt_left + (user.num_decode_left > 0) for user in world.users)
    admitted = [chunk for step in world.steps.values() for chunk in step.chunks if chunk.is_admitted]
    queued = sorted(
        (chunk for step in world.steps.values() for chunk in step.chunks if not chunk.is_admitted),
        key=lambda chunk: chunk.request_id,
    )
    probe_tokens = sum(chunk.num_tokens for chunk in admitted)
    slots = [SlotOccupancy(0, SlotKind.SERVING, "base-adapter@1", len(world.users), float(round_index))]
    for step in world.steps.values():
        slots += [SlotOccupancy(slot_id, SlotKind.PROBE, step.job_id, 1) for slot_id in step.slot_ids]
    return RoundObservation(
        now_s=round_index * engine.round_ms / 1000.0,
        latency=LatencySignal(
            ttft_p95_ms=percentile_ms(recent, 0.95),
            num_user_running=len(world.users) - len(waiting),
            num_user_waiting=len(waiting),
            num_engine_running=len(world.users) - len(waiting) + len(world.steps),
            num_engine_waiting=len(waiting),
            num_user_tokens_in_flight=user_tokens,
            seconds_since_user_arrival_s=(
                None
                if world.last_arrival_round is None
                else (round_index - world.last_arrival_round) * engine.round_ms / 1000.0
            ),
            max_user_wait_ms=max(  # no first token yet, whether queued or part-way through its prefill
                ((round_index - user.arrival_round) * engine.round_ms for user in prefilling), default=0.0
            ),
        ),
        num_probe_tokens_in_flight=probe_tokens,
        jobs=tuple(
            JobDemand(
                job.job_id,
                job.weight,
                job.num_step_tokens,
                job.num_probe_slots,
                is_paused=_is_paused(job, round_index),
                has_step_in_flight=job.job_id in world.steps,
            )
            for job in jobs
        ),
        slots=tuple(slots),
        serving_demands=(ServingDemand("base-adapter@1", is_pinned=True, last_used_s=float(round_index)),),
        chunk_requests=tuple(ChunkRequest(chunk.request_id, chunk.job_id, chunk.num_tokens) for chunk in queued),
    )


def _run_engine_round(engine: SyntheticEngine, world: _World, round_index: int) -> None:
    user_backlog = sum(user.num_prompt_left + (user.num_decode_left > 0) for user in world.users)
    running = [chunk for step in world.steps.values() for chunk in step.chunks if chunk.is_admitted]
    probe_backlog = sum(chunk.num_tokens_left for chunk in running)
    capacity = float(engine.num_tokens_per_round)
    total = user_backlog + probe_backlog
    user_capacity = user_backlog if total <= capacity else capacity * user_backlog / total
    probe_capacity = min(probe_backlog, capacity - user_capacity)

    for user in world.users:  # decoders first: one token each, already in the batch
        if user.num_prompt_left == 0 and user.num_decode_left > 0 and user_capacity >= 1:
            user.num_decode_left -= 1
            user_capacity -= 1
    for user in world.users:  # then prompts, first come first served
        if user.num_prompt_left > 0 and user_capacity > 0:
            done = min(user.num_prompt_left, int(user_capacity))
            user.num_prompt_left -= done
            user_capacity -= done
            if user.num_prompt_left == 0:
                rounds = round_index - user.arrival_round + 1
                world.ttft_samples.append((round_index, engine.base_ttft_ms + rounds * engine.round_ms))
    world.users = [user for user in world.users if user.num_prompt_left > 0 or user.num_decode_left > 0]

    for job_id, step in list(world.steps.items()):
        for chunk in [chunk for chunk in step.chunks if chunk.is_admitted]:
            share = probe_capacity * chunk.num_tokens_left / probe_backlog if probe_backlog else 0.0
            done = min(chunk.num_tokens_left, share)
            chunk.num_tokens_left -= done
            world.scored[job_id] = world.scored.get(job_id, 0.0) + done
            if chunk.num_tokens_left <= 1e-6:
                step.chunks.remove(chunk)
        if not step.chunks:
            del world.steps[job_id]


def simulate(
    config: PlannerConfig,
    engine: SyntheticEngine,
    jobs: Sequence[SimJob],
    user_arrivals_per_round: Sequence[int],
) -> SimResult:
    """Run one planner round per engine round, len(user_arrivals_per_round) rounds in all."""
    require_count(engine.num_tokens_per_round, "num_tokens_per_round")
    require(engine.num_tokens_per_round > 0, "num_tokens_per_round", "must be > 0")
    state = initial_planner_state(config)
    world = _World()
    records: list[PlannerRecord] = []
    ttft_by_round: list[tuple[float, ...]] = []
    max_slots_in_use = 0
    for round_index, num_arrivals in enumerate(user_arrivals_per_round):
        require_count(num_arrivals, "user_arrivals_per_round")
        plan = plan_round(config, state, _observe(engine, world, jobs, round_index))
        state = plan.next_state
        records.append(plan.record)
        for grant in plan.step_grants:
            chunks = world.new_chunks(grant.job_id, grant.num_tokens, engine.num_chunk_tokens)
            world.steps[grant.job_id] = _Step(grant.job_id, grant.probe_slot_ids, chunks)
        admitted_ids = {chunk.request_id for chunk in plan.chunk_grants}
        for step in world.steps.values():
            for chunk in step.chunks:
                chunk.is_admitted = chunk.is_admitted or chunk.request_id in admitted_ids
        max_slots_in_use = max(max_slots_in_use, len(plan.slots.occupancy))
        if num_arrivals:
            world.last_arrival_round = round_index
        world.users += [
            _User(round_index, engine.num_user_prompt_tokens, engine.num_decode_rounds) for _ in range(num_arrivals)
        ]
        num_samples_before = len(world.ttft_samples)
        _run_engine_round(engine, world, round_index)
        ttft_by_round.append(tuple(ttft for _, ttft in world.ttft_samples[num_samples_before:]))
    return SimResult(
        records=tuple(records),
        user_ttft_ms_by_round=tuple(ttft_by_round),
        tokens_scored_by_job=tuple(sorted((job_id, round(done)) for job_id, done in world.scored.items())),
        max_slots_in_use=max_slots_in_use,
    )
