"""Per-engine-step gate: how many queued probe tokens may join the next forward, decided inside vLLM's scheduler.

The co-scheduler's token budget (controller.py) limits how much probe work is *queued in* the engine. It runs
in the service process and reacts within a round trip, but whatever it has queued, vLLM packs into the next
forward next to any user request, up to `max_num_batched_tokens`. A user who arrives then waits behind (and
shares a forward with) hundreds of probe tokens. The gate closes that gap at the finest grain there is: every
engine step, vLLM's scheduler (engine/step_gate_scheduler.py) asks it how many probe tokens the step may take
and holds the rest back in the waiting queue for a later step:

- no user seen for `user_memory_s`: no limit; ZO fills the engine;
- a user request waits for its first forward: at most `tokens_with_user_prefill` probe tokens join it (default
  0: the user's prefill runs as if ZO did not exist);
- users are running (decoding) or were seen lately: at most `tokens_with_users` probe tokens per step, so a
  user arriving waits behind a short forward, never a full one. The service's latency controller may lower
  this limit at run time (`StepView.tokens_with_users_cap`, read from engine/gate_cap.py every step) while
  users' time to first token is over its target.

Probe tokens already running (the rest of a prefill that a previous step split) count against the allowance;
they are scheduled first by vLLM and cannot be held back. Queued probes are admitted whole, oldest (best
priority) first; when the allowance is positive but the first one does not fit, it is admitted alone, so an
allowance smaller than one prompt slows ZO down instead of stopping it.

Pure: plain numbers in, plain numbers out.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from scheduler.planning.records import require, require_count, require_finite


@dataclass(frozen=True)
class StepGateConfig:
    probe_priority: int  # requests with this vLLM priority or a worse (higher) one are probes
    tokens_with_users: int = 256
    tokens_with_user_prefill: int = 0
    user_memory_s: float = 2.0
    cap_path: str | None = None  # the shared word a latency controller lowers the limit with (engine/gate_cap.py)

    def __post_init__(self) -> None:
        require(isinstance(self.probe_priority, int), "probe_priority", f"must be an int, got {self.probe_priority!r}")
        require_count(self.tokens_with_users, "tokens_with_users")
        require_count(self.tokens_with_user_prefill, "tokens_with_user_prefill")
        require_finite(self.user_memory_s, "user_memory_s")
        require(self.user_memory_s >= 0, "user_memory_s", "must be >= 0")

    def to_dict(self) -> dict:
        return dict(
            probe_priority=self.probe_priority,
            tokens_with_users=self.tokens_with_users,
            tokens_with_user_prefill=self.tokens_with_user_prefill,
            user_memory_s=self.user_memory_s,
            cap_path=self.cap_path,
        )

    @classmethod
    def from_dict(cls, values: dict) -> StepGateConfig:
        return cls(**values)


@dataclass(frozen=True)
class StepView:
    """What the engine's scheduler holds at the start of a step."""

    now_s: float
    num_user_waiting: int  # user requests in the waiting queue (they need a prefill)
    num_user_running: int
    num_probe_tokens_running: int  # uncomputed prompt tokens of probes already running (split prefills)
    # The latency controller's current cap on probe tokens per step next to users (engine/gate_cap.py);
    # None: none written, `tokens_with_users` alone limits. It only ever lowers that limit.
    tokens_with_users_cap: int | None = None


@dataclass(frozen=True)
class GateDecision:
    allowance: int | None  # probe tokens the step may take; None: no limit
    last_user_seen_s: float | None


def step_allowance(config: StepGateConfig, view: StepView, last_user_seen_s: float | None) -> GateDecision:
    users_now = view.num_user_waiting > 0 or view.num_user_running > 0
    if users_now:
        last_user_seen_s = view.now_s
    recent = last_user_seen_s is not None and view.now_s - last_user_seen_s <= config.user_memory_s
    if not users_now and not recent:
        return GateDecision(allowance=None, last_user_seen_s=last_user_seen_s)
    with_users = config.tokens_with_users
    if view.tokens_with_users_cap is not None:
        with_users = min(with_users, view.tokens_with_users_cap)
    limit = min(config.tokens_with_user_prefill, with_users) if view.num_user_waiting > 0 else with_users
    return GateDecision(allowance=max(0, limit - view.num_probe_tokens_running), last_user_seen_s=last_user_seen_s)


def num_admitted(allowance: int | None, queued_tokens: Iterable[int]) -> int | None:
    """How many of the queued probes (in queue order, their uncomputed tokens) join the step; None: all."""
    if allowance is None:
        return None
    admitted = 0
    used = 0
    for tokens in queued_tokens:
        if used + tokens > allowance and not (admitted == 0 and allowance > 0):
            break
        used += tokens
        admitted += 1
        if used >= allowance:
            break
    return admitted
