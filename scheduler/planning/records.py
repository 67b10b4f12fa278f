"""Observation records the planner reads, and the visibility record it writes.

Everything here is a frozen dataclass that validates itself: bad input raises `PlanningError` (a
`ValueError`) naming the field, so the async loop that builds these from engine stats fails loudly at the
boundary instead of deep inside a policy.
"""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass


class PlanningError(ValueError):
    """Root error of `scheduler.planning`: an observation or config that violates its contract."""


def require(ok: bool, field: str, message: str) -> None:
    if not ok:
        raise PlanningError(f"{field}: {message}")


# The checks below run for every record of every planning round (hundreds a second while users and jobs
# share the engine): each message is built only once a check has failed.


def require_nonnegative(value: float, field: str) -> None:
    if not value >= 0:
        raise PlanningError(f"{field}: must be >= 0, got {value}")


def require_count(value: int, field: str) -> None:
    # bool is an int subclass; a True where a count belongs is always a wiring bug.
    if not isinstance(value, int) or isinstance(value, bool):
        raise PlanningError(f"{field}: must be an int, got {value!r}")
    require_nonnegative(value, field)


def require_finite(value: float, field: str) -> None:
    if not isinstance(value, (int, float)) or not math.isfinite(value):
        raise PlanningError(f"{field}: must be a finite number, got {value!r}")


def require_positive(value: float, field: str) -> None:
    if not value > 0:
        raise PlanningError(f"{field}: must be > 0, got {value}")


@dataclass(frozen=True)
class LatencySignal:
    """What the service measured on live user traffic since the previous round.

    ttft_p95_ms: p95 time-to-first-token of user requests over the service's recent window; None when the
        window holds no samples (no user request got a first token lately).
    num_user_running / num_user_waiting: user requests the engine is running / holding in its waiting queue
        (waiting = admitted to the engine, not yet scheduled; that is the queue probes can delay).
    num_engine_running / num_engine_waiting: the engine's own totals (users + probes), for the record.
    num_user_tokens_in_flight: prompt + generated tokens of running user requests, for the serve/train share.
    seconds_since_user_arrival_s: time since the latest user request arrived (None: none yet); users come
        and go between Poisson arrivals, and a short gap is not "no traffic".
    max_user_wait_ms: how long the oldest user request still without a first token has waited (0: none).
    """

    ttft_p95_ms: float | None = None
    num_user_running: int = 0
    num_user_waiting: int = 0
    num_engine_running: int = 0
    num_engine_waiting: int = 0
    num_user_tokens_in_flight: int = 0
    seconds_since_user_arrival_s: float | None = None
    max_user_wait_ms: float = 0.0

    def __post_init__(self) -> None:
        if self.seconds_since_user_arrival_s is not None:
            require_finite(self.seconds_since_user_arrival_s, "seconds_since_user_arrival_s")
            require(self.seconds_since_user_arrival_s >= 0, "seconds_since_user_arrival_s", "must be >= 0")
        require_finite(self.max_user_wait_ms, "max_user_wait_ms")
        require_nonnegative(self.max_user_wait_ms, "max_user_wait_ms")
        if self.ttft_p95_ms is not None:
            require_finite(self.ttft_p95_ms, "ttft_p95_ms")
            require_nonnegative(self.ttft_p95_ms, "ttft_p95_ms")
        for name in (
            "num_user_running",
            "num_user_waiting",
            "num_engine_running",
            "num_engine_waiting",
            "num_user_tokens_in_flight",
        ):
            require_count(getattr(self, name), name)

    @property
    def has_user_traffic(self) -> bool:
        return self.num_user_running + self.num_user_waiting > 0


@dataclass(frozen=True)
class JobDemand:
    """One training job as the planner sees it this round.

    num_step_tokens: scoring tokens one step submits (B examples x 2q probes x tokens per sequence).
    num_probe_slots: LoRA slots one step needs at once (2q).
    has_step_in_flight: a step was granted and has not finished; ZO steps are sequential (step N+1
        perturbs version N+1), so such a job cannot be granted again until its step completes.
    wants_step: the job asks for its next step now. A running job between two steps (committing,
        publishing, evaluating) does not, but still counts for fairness for `idle_s` seconds of grace.
    """

    job_id: str
    weight: float
    num_step_tokens: int
    num_probe_slots: int
    is_paused: bool = False
    has_step_in_flight: bool = False
    wants_step: bool = True
    idle_s: float = 0.0  # seconds since its last step finished, while it neither waits nor steps

    @property
    def is_ready(self) -> bool:
        return self.wants_step and not self.is_paused and not self.has_step_in_flight

    def __post_init__(self) -> None:
        require(isinstance(self.job_id, str) and self.job_id != "", "job_id", "must be a non-empty string")
        require_finite(self.idle_s, "idle_s")
        require_nonnegative(self.idle_s, "idle_s")
        require_finite(self.weight, "weight")
        require_positive(self.weight, "weight")
        require_count(self.num_step_tokens, "num_step_tokens")
        require(self.num_step_tokens > 0, "num_step_tokens", "must be > 0")
        require_count(self.num_probe_slots, "num_probe_slots")
        require(self.num_probe_slots > 0, "num_probe_slots", "must be > 0")


@dataclass(frozen=True)
class ChunkRequest:
    """A chunk of a granted step's scoring sequences, queued to enter the engine (FIFO across jobs).

    A step's sequences go in as chunks of a few hundred tokens, so the token budget bounds how much probe
    work any engine forward holds: a user arriving waits behind at most that much.
    """

    request_id: int
    job_id: str
    num_tokens: int

    def __post_init__(self) -> None:
        require_count(self.request_id, "request_id")
        require(isinstance(self.job_id, str) and self.job_id != "", "job_id", "must be a non-empty string")
        require_count(self.num_tokens, "num_tokens")
        require(self.num_tokens > 0, "num_tokens", "must be > 0")


class SlotKind(enum.Enum):
    SERVING = "serving"  # holds an adapter state `name@version` that user requests run against
    PROBE = "probe"  # holds one perturbed copy θ ± εz of a job's adapter, rewritten every step


@dataclass(frozen=True)
class SlotOccupancy:
    """One occupied LoRA slot. Slots not listed are free.

    owner: the adapter key (`name@version`) for SERVING, the job id for PROBE.
    num_in_flight: requests running against this slot; a slot with any is never reassigned.
    """

    slot_id: int
    kind: SlotKind
    owner: str
    num_in_flight: int = 0
    last_used_s: float = 0.0

    def __post_init__(self) -> None:
        require_count(self.slot_id, "slot_id")
        if not isinstance(self.kind, SlotKind):
            raise PlanningError(f"kind: must be a SlotKind, got {self.kind!r}")
        require(isinstance(self.owner, str) and self.owner != "", "owner", "must be a non-empty string")
        require_count(self.num_in_flight, "num_in_flight")
        require_finite(self.last_used_s, "last_used_s")


@dataclass(frozen=True)
class ServingDemand:
    """An adapter state the data plane wants resident.

    is_pinned: keep resident even when idle (the double buffer of an adapting adapter: its live version
        and the version being replaced while requests drain; or a non-training adapter an operator pinned).
    num_waiting: user requests held back by the service because this key has no slot yet.
    """

    adapter_key: str
    num_waiting: int = 0
    is_pinned: bool = False
    last_used_s: float = 0.0

    def __post_init__(self) -> None:
        require(isinstance(self.adapter_key, str) and self.adapter_key != "", "adapter_key", "must be non-empty")
        require_count(self.num_waiting, "num_waiting")
        require_finite(self.last_used_s, "last_used_s")


class JobStatus(enum.Enum):
    GRANTED = "granted"
    STEP_IN_FLIGHT = "step_in_flight"
    PAUSED = "paused"
    WAITING_FOR_SLOTS = "waiting_for_slots"
    NEEDS_MORE_SLOTS_THAN_EXIST = "needs_more_slots_than_exist"
    BEHIND_BLOCKED_JOB = "behind_blocked_job"  # a job ahead in fair order is waiting; no overtaking
    AHEAD_OF_SHARE = "ahead_of_share"  # has had more than its weighted share: waits for the others
    IDLE = "idle"  # between two steps (committing, evaluating)


@dataclass(frozen=True)
class JobShareRecord:
    job_id: str
    weight: float
    status: JobStatus
    num_tokens_granted: int  # this round
    num_tokens_granted_total: int  # since the job (re)entered the fair queue; reset by a pause
    recent_token_share: float  # this job's fraction of recently granted scoring tokens (EWMA)


@dataclass(frozen=True)
class PlannerRecord:
    """One round's numbers, for logs and Prometheus gauges (names map to zoserve_planner_*)."""

    num_round: int
    budget_tokens: int
    max_tokens_in_flight: int
    measured_ttft_ms: float | None
    target_ttft_ms: float
    budget_reason: str
    num_probe_tokens_in_flight: int  # before this round's chunk grants
    num_tokens_admitted: int  # chunk tokens admitted into the engine this round
    num_step_tokens_granted: int  # tokens of the steps granted this round (what fairness charges)
    num_chunks_waiting: int  # chunks still queued after this round
    num_user_tokens_in_flight: int
    num_user_waiting: int
    num_engine_running: int
    num_engine_waiting: int
    train_token_share: float  # probe tokens / (probe + user tokens) in flight after this round's grants
    serve_token_share: float
    num_slots: int
    num_slots_serving: int
    num_slots_probe: int
    num_slots_free: int
    jobs: tuple[JobShareRecord, ...]
