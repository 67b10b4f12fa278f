"""Latency-aware admission controller: how many ZO scoring tokens may be in flight.

TCP-style congestion control with the user TTFT target in place of packet loss:

- slow start (multiplicative growth) up to a threshold, then additive increase, while user latency sits
  comfortably under target (below `increase_below_fraction` x target: the hysteresis band stops the budget
  from oscillating around the target);
- hold inside the band, and hold when the latency trend (this round minus last) projects a crossing of the
  target next round: the gradient term reacts before the p95 window catches up;
- multiplicative decrease when p95 is over target, scaled by target/measured (a 3x overshoot cuts harder than
  a 10% one) and spaced `min_rounds_between_decreases` apart because the p95 window still holds samples from
  before the last cut;
- an immediate clamp, no cooldown, when user requests wait in the engine queue while probes are in flight:
  that is the direct sign that probes hold capacity users need;
- no growth while the budget is not what limits ZO, i.e. tokens in flight plus the steps ready to go are
  under `min_utilization_for_increase` x budget (cwnd validation, RFC 7661): otherwise a quiet period would
  bank a large budget that a new job could spend all at once in front of users. Demand, not the in-flight
  snapshot, is the signal: short steps finish between rounds and would make a busy budget look idle.

With no user traffic at all the budget grows to `max_tokens_in_flight` regardless of use. The budget never
leaves [min_tokens_in_flight, max_tokens_in_flight]. `update_budget` is pure: state in, state out.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from scheduler.planning.records import LatencySignal, require, require_count, require_finite


class BudgetReason(enum.Enum):
    INITIAL = "initial"
    IDLE_GROW = "idle_grow"  # no user traffic: fill the engine
    SLOW_START = "slow_start"
    ADDITIVE_INCREASE = "additive_increase"
    HOLD_AT_MAX = "hold_at_max"
    HOLD_BAND = "hold_band"  # latency between increase_below_fraction x target and target
    HOLD_TREND = "hold_trend"  # under target, but rising fast enough to cross it next round
    HOLD_UNDERUSED = "hold_underused"
    HOLD_NO_SAMPLES = "hold_no_samples"  # users present, no TTFT measured yet
    HOLD_COOLDOWN = "hold_cooldown"  # over target, but the last cut has not shown in the window yet
    HOLD_USERS_WAITING = "hold_users_waiting"  # users queue, but no probes in flight to blame
    DECREASE_OVER_TARGET = "decrease_over_target"
    CLAMP_USERS_WAITING = "clamp_users_waiting"


@dataclass(frozen=True)
class ControllerConfig:
    target_ttft_ms: float
    max_tokens_in_flight: int
    min_tokens_in_flight: int = 0
    initial_tokens_in_flight: int | None = None  # None: max(min, additive_increase_tokens)
    additive_increase_tokens: int = 256
    slow_start_factor: float = 2.0
    decrease_factor: float = 0.5  # the mildest cut when over target
    min_decrease_factor: float = 0.25  # the harshest cut, however far over target
    waiting_clamp_factor: float = 0.5  # applied to min(budget, in flight) when users wait behind probes
    increase_below_fraction: float = 0.8
    trend_weight: float = 1.0  # rounds of the current slope projected forward
    min_utilization_for_increase: float = 0.5
    min_rounds_between_decreases: int = 2

    def __post_init__(self) -> None:
        require_finite(self.target_ttft_ms, "target_ttft_ms")
        require(self.target_ttft_ms > 0, "target_ttft_ms", "must be > 0")
        require_count(self.max_tokens_in_flight, "max_tokens_in_flight")
        require(self.max_tokens_in_flight > 0, "max_tokens_in_flight", "must be > 0")
        require_count(self.min_tokens_in_flight, "min_tokens_in_flight")
        require(
            self.min_tokens_in_flight <= self.max_tokens_in_flight,
            "min_tokens_in_flight",
            "must be <= max_tokens_in_flight",
        )
        if self.initial_tokens_in_flight is not None:
            require_count(self.initial_tokens_in_flight, "initial_tokens_in_flight")
        require_count(self.additive_increase_tokens, "additive_increase_tokens")
        require(self.additive_increase_tokens > 0, "additive_increase_tokens", "must be > 0")
        require(self.slow_start_factor >= 1.0, "slow_start_factor", "must be >= 1")
        for name in ("decrease_factor", "min_decrease_factor", "waiting_clamp_factor"):
            value = getattr(self, name)
            require_finite(value, name)
            require(0.0 <= value < 1.0, name, f"must be in [0, 1), got {value}")
        require(self.min_decrease_factor <= self.decrease_factor, "min_decrease_factor", "must be <= decrease_factor")
        require(0.0 < self.increase_below_fraction <= 1.0, "increase_below_fraction", "must be in (0, 1]")
        require(self.trend_weight >= 0.0, "trend_weight", "must be >= 0")
        require(
            0.0 <= self.min_utilization_for_increase <= 1.0, "min_utilization_for_increase", "must be in [0, 1]"
        )
        require_count(self.min_rounds_between_decreases, "min_rounds_between_decreases")

    def clamp(self, num_tokens: float) -> int:
        return int(min(self.max_tokens_in_flight, max(self.min_tokens_in_flight, math.floor(num_tokens))))


@dataclass(frozen=True)
class ControllerState:
    budget_tokens: int
    slow_start_threshold_tokens: int
    target_ttft_ms: float
    measured_ttft_ms: float | None = None
    previous_ttft_ms: float | None = None  # last non-empty measurement, for the trend term
    last_reason: BudgetReason = BudgetReason.INITIAL
    num_rounds_since_decrease: int = field(default=1 << 30)


def initial_controller_state(config: ControllerConfig) -> ControllerState:
    initial = config.initial_tokens_in_flight
    if initial is None:
        initial = config.additive_increase_tokens
    return ControllerState(
        budget_tokens=config.clamp(initial),
        slow_start_threshold_tokens=config.max_tokens_in_flight,
        target_ttft_ms=config.target_ttft_ms,
    )


def update_budget(
    config: ControllerConfig,
    state: ControllerState,
    signal: LatencySignal,
    num_probe_tokens_in_flight: int,
    num_probe_tokens_wanted: int | None = None,
) -> ControllerState:
    """One control round. Call once per planning round with what was measured since the previous one.

    num_probe_tokens_wanted: in-flight tokens plus the step tokens of every job ready to start a step
    (None: just the in-flight tokens).
    """
    require_count(num_probe_tokens_in_flight, "num_probe_tokens_in_flight")
    if num_probe_tokens_wanted is None:
        num_probe_tokens_wanted = num_probe_tokens_in_flight
    require_count(num_probe_tokens_wanted, "num_probe_tokens_wanted")
    budget = state.budget_tokens
    threshold = state.slow_start_threshold_tokens
    rounds_since_decrease = state.num_rounds_since_decrease + 1
    latency = signal.ttft_p95_ms
    target = config.target_ttft_ms

    def grow(is_idle: bool) -> tuple[int, BudgetReason]:
        if budget >= config.max_tokens_in_flight:
            return config.max_tokens_in_flight, BudgetReason.HOLD_AT_MAX
        if budget < threshold:
            grown = min(threshold, max(budget + config.additive_increase_tokens, budget * config.slow_start_factor))
            reason = BudgetReason.SLOW_START
        else:
            grown = budget + config.additive_increase_tokens
            reason = BudgetReason.ADDITIVE_INCREASE
        return config.clamp(grown), BudgetReason.IDLE_GROW if is_idle else reason

    if signal.num_user_waiting > 0 and num_probe_tokens_in_flight > 0:
        # Cut from what is actually in flight: cutting an unused budget would change nothing.
        budget = config.clamp(min(budget, num_probe_tokens_in_flight) * config.waiting_clamp_factor)
        threshold = max(budget, config.min_tokens_in_flight)
        reason = BudgetReason.CLAMP_USERS_WAITING
        rounds_since_decrease = 0
    elif signal.num_user_waiting > 0:
        reason = BudgetReason.HOLD_USERS_WAITING
    elif not signal.has_user_traffic:
        # Nobody to slow down: ignore a p95 window still holding samples of users who left, forget the
        # congestion threshold they set, and slow-start straight to max.
        threshold = config.max_tokens_in_flight
        budget, reason = grow(is_idle=True)
    elif latency is not None and latency > target:
        if rounds_since_decrease < config.min_rounds_between_decreases:
            reason = BudgetReason.HOLD_COOLDOWN
        else:
            factor = min(config.decrease_factor, max(config.min_decrease_factor, target / latency))
            budget = config.clamp(budget * factor)
            threshold = budget
            reason = BudgetReason.DECREASE_OVER_TARGET
            rounds_since_decrease = 0
    elif latency is None:
        reason = BudgetReason.HOLD_NO_SAMPLES
    elif latency >= config.increase_below_fraction * target:
        reason = BudgetReason.HOLD_BAND
    elif (
        state.previous_ttft_ms is not None
        and latency + config.trend_weight * (latency - state.previous_ttft_ms) >= target
    ):
        reason = BudgetReason.HOLD_TREND
    elif num_probe_tokens_wanted < config.min_utilization_for_increase * budget:
        reason = BudgetReason.HOLD_UNDERUSED
    else:
        budget, reason = grow(is_idle=False)

    return ControllerState(
        budget_tokens=budget,
        slow_start_threshold_tokens=threshold,
        target_ttft_ms=target,
        measured_ttft_ms=latency,
        previous_ttft_ms=latency if latency is not None else state.previous_ttft_ms,
        last_reason=reason,
        num_rounds_since_decrease=min(rounds_since_decrease, 1 << 30),
    )


def percentile_ms(samples_ms: Sequence[float], quantile: float) -> float | None:
    """Nearest-rank percentile of a window of latency samples; None for an empty window.

    Lets the service keep a plain deque of recent TTFTs and hand the planner a p95 without numpy.
    """
    require(0.0 < quantile <= 1.0, "quantile", f"must be in (0, 1], got {quantile}")
    if not samples_ms:
        return None
    ordered = sorted(samples_ms)
    rank = max(1, math.ceil(quantile * len(ordered)))
    return float(ordered[rank - 1])
