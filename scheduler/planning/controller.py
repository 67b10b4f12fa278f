"""Latency-aware admission controller: how many ZO scoring tokens may be in flight in the engine.

TCP-style congestion control with the user TTFT target in place of packet loss. Every rule is paced in
*time*, not in rounds: the loop plans a round on every event (a chunk returns, a user arrives), so a
per-round rule would grow or cut faster the busier the engine is.

- users present = a user request in the engine, or one arrived within `user_traffic_memory_s`. At 30 % load
  Poisson gaps of a few hundred ms are normal; treating each gap as "no traffic" slow-started the budget to
  max and the next user landed behind a full step.
- users arriving after an idle spell cut the budget at once to what it was when users were last present
  (or the initial budget): the first users must not meet a full-width engine while the p95 window is empty
  (TCP's restart after idle, RFC 5681 §4.1). From there it grows again while latency allows.
- slow start (×`slow_start_factor` per `increase_interval_s`) up to a threshold, then additive increase,
  while user latency sits under `increase_below_fraction` × target (the band stops oscillation around it);
- hold inside the band, and hold when the latency trend projects a crossing of the target;
- multiplicative decrease when p95 is over target, scaled by target/measured and spaced
  `decrease_interval_s` apart because the p95 window still holds samples from before the last cut;
- an immediate clamp when a user request has waited longer than `clamp_after_wait_fraction` × target for
  its first token while probes are in flight: the direct sign that probes hold capacity users need (a user
  waiting a few ms for the next forward is normal and is not a signal);
- no growth while the budget is not what limits ZO (cwnd validation, RFC 7661): demand (tokens in flight
  plus tokens queued to go) under `min_utilization_for_increase` × budget.

With no user traffic the budget grows to `max_tokens_in_flight`. The budget never leaves
[min_tokens_in_flight, max_tokens_in_flight]; a floor of one probe chunk keeps ZO trickling next to users.
`update_budget` is pure: state in, state out.
"""

from __future__ import annotations

import enum
import math
from collections.abc import Sequence
from dataclasses import dataclass

from scheduler.planning.records import LatencySignal, require, require_count, require_finite


class BudgetReason(enum.Enum):
    INITIAL = "initial"
    IDLE_GROW = "idle_grow"  # no user traffic: fill the engine
    SLOW_START = "slow_start"
    ADDITIVE_INCREASE = "additive_increase"
    HOLD_AT_MAX = "hold_at_max"
    HOLD_PACING = "hold_pacing"  # would grow, but the last increase is too recent
    HOLD_BAND = "hold_band"  # latency between increase_below_fraction x target and target
    HOLD_TREND = "hold_trend"  # under target, but rising fast enough to cross it soon
    HOLD_UNDERUSED = "hold_underused"
    HOLD_NO_SAMPLES = "hold_no_samples"  # users present, no TTFT measured yet
    HOLD_COOLDOWN = "hold_cooldown"  # over target, but the last cut has not shown in the window yet
    HOLD_USERS_WAITING = "hold_users_waiting"  # a user waits long, but no probes in flight to blame
    USERS_ARRIVED = "users_arrived"  # first users after an idle spell: back to the budget users last had
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
    increase_interval_s: float = 0.05  # at most one increase per interval (≈ a few engine steps)
    decrease_factor: float = 0.5  # the mildest cut when over target
    min_decrease_factor: float = 0.25  # the harshest cut, however far over target
    decrease_interval_s: float = 1.0  # at most one cut per interval (the p95 window lags)
    waiting_clamp_factor: float = 0.5  # applied to min(budget, in flight) when a user waits behind probes
    clamp_after_wait_fraction: float = 0.5  # a user waiting longer than this x target triggers the clamp
    increase_below_fraction: float = 0.8
    trend_weight: float = 1.0  # how far the slope between two measurements is projected forward
    min_utilization_for_increase: float = 0.5
    user_traffic_memory_s: float = 2.0

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
        for name in ("increase_interval_s", "decrease_interval_s", "user_traffic_memory_s", "clamp_after_wait_fraction"):
            value = getattr(self, name)
            require_finite(value, name)
            require(value >= 0.0, name, f"must be >= 0, got {value}")

    def clamp(self, num_tokens: float) -> int:
        return int(min(self.max_tokens_in_flight, max(self.min_tokens_in_flight, math.floor(num_tokens))))

    def has_user_traffic(self, signal: LatencySignal) -> bool:
        if signal.num_user_running + signal.num_user_waiting > 0:
            return True
        since = signal.seconds_since_user_arrival_s
        return since is not None and since <= self.user_traffic_memory_s


_NEVER = -math.inf


@dataclass(frozen=True)
class ControllerState:
    budget_tokens: int
    slow_start_threshold_tokens: int
    target_ttft_ms: float
    measured_ttft_ms: float | None = None
    previous_ttft_ms: float | None = None  # last non-empty measurement, for the trend term
    last_reason: BudgetReason = BudgetReason.INITIAL
    last_increase_s: float = _NEVER
    last_decrease_s: float = _NEVER
    had_user_traffic: bool = False
    user_budget_tokens: int | None = None  # the budget when users were last present


def initial_budget(config: ControllerConfig) -> int:
    initial = config.initial_tokens_in_flight
    if initial is None:
        initial = config.additive_increase_tokens
    return config.clamp(initial)


def initial_controller_state(config: ControllerConfig) -> ControllerState:
    return ControllerState(
        budget_tokens=initial_budget(config),
        slow_start_threshold_tokens=config.max_tokens_in_flight,
        target_ttft_ms=config.target_ttft_ms,
    )


def update_budget(
    config: ControllerConfig,
    state: ControllerState,
    signal: LatencySignal,
    num_probe_tokens_in_flight: int,
    num_probe_tokens_wanted: int | None = None,
    now_s: float = 0.0,
) -> ControllerState:
    """One control round, with what was measured up to `now_s` (monotonic seconds).

    num_probe_tokens_wanted: in-flight tokens plus the tokens queued to go (None: just the in-flight ones).
    """
    require_count(num_probe_tokens_in_flight, "num_probe_tokens_in_flight")
    require_finite(now_s, "now_s")
    if num_probe_tokens_wanted is None:
        num_probe_tokens_wanted = num_probe_tokens_in_flight
    require_count(num_probe_tokens_wanted, "num_probe_tokens_wanted")
    budget = state.budget_tokens
    threshold = state.slow_start_threshold_tokens
    last_increase, last_decrease = state.last_increase_s, state.last_decrease_s
    latency = signal.ttft_p95_ms
    target = config.target_ttft_ms
    may_increase = now_s - last_increase >= config.increase_interval_s

    def grow(is_idle: bool) -> tuple[int, BudgetReason, float]:
        if budget >= config.max_tokens_in_flight:
            return config.max_tokens_in_flight, BudgetReason.HOLD_AT_MAX, last_increase
        if not may_increase:
            return budget, BudgetReason.HOLD_PACING, last_increase
        if budget < threshold:
            grown = min(threshold, max(budget + config.additive_increase_tokens, budget * config.slow_start_factor))
            reason = BudgetReason.SLOW_START
        else:
            grown = budget + config.additive_increase_tokens
            reason = BudgetReason.ADDITIVE_INCREASE
        return config.clamp(grown), BudgetReason.IDLE_GROW if is_idle else reason, now_s

    user_delayed = signal.max_user_wait_ms > config.clamp_after_wait_fraction * target
    has_users = config.has_user_traffic(signal)
    user_budget = state.user_budget_tokens
    if has_users and not state.had_user_traffic:
        restart = config.clamp(user_budget if user_budget is not None else initial_budget(config))
        if restart < budget:
            budget, threshold = restart, restart
            reason = BudgetReason.USERS_ARRIVED
            return _next(state, budget, threshold, latency, reason, now_s, last_decrease, True, budget)
    if user_delayed and num_probe_tokens_in_flight > 0:
        # Cut from what is actually in flight: cutting an unused budget would change nothing.
        budget = config.clamp(min(budget, num_probe_tokens_in_flight) * config.waiting_clamp_factor)
        threshold = max(budget, config.min_tokens_in_flight)
        reason = BudgetReason.CLAMP_USERS_WAITING
        last_decrease = now_s
    elif user_delayed:
        reason = BudgetReason.HOLD_USERS_WAITING
    elif not has_users:
        # Nobody to slow down: ignore a p95 window still holding samples of users who left, forget the
        # congestion threshold they set, and slow-start to max.
        threshold = config.max_tokens_in_flight
        budget, reason, last_increase = grow(is_idle=True)
    elif latency is not None and latency > target:
        if now_s - last_decrease < config.decrease_interval_s:
            reason = BudgetReason.HOLD_COOLDOWN
        else:
            factor = min(config.decrease_factor, max(config.min_decrease_factor, target / latency))
            budget = config.clamp(budget * factor)
            threshold = budget
            reason = BudgetReason.DECREASE_OVER_TARGET
            last_decrease = now_s
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
        budget, reason, last_increase = grow(is_idle=False)

    return _next(
        state, budget, threshold, latency, reason, last_increase, last_decrease, has_users,
        budget if has_users else user_budget,
    )


def _next(
    state: ControllerState,
    budget: int,
    threshold: int,
    latency: float | None,
    reason: BudgetReason,
    last_increase: float,
    last_decrease: float,
    has_users: bool,
    user_budget: int | None,
) -> ControllerState:
    return ControllerState(
        budget_tokens=budget,
        slow_start_threshold_tokens=threshold,
        target_ttft_ms=state.target_ttft_ms,
        measured_ttft_ms=latency,
        previous_ttft_ms=latency if latency is not None else state.previous_ttft_ms,
        last_reason=reason,
        last_increase_s=last_increase,
        last_decrease_s=last_decrease,
        had_user_traffic=has_users,
        user_budget_tokens=user_budget,
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
