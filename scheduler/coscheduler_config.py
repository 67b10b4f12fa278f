"""The co-scheduler's settings and its point-in-time view, as plain records (no asyncio, no engine)."""

from __future__ import annotations

from dataclasses import dataclass

from scheduler.planning import ControllerConfig


@dataclass(frozen=True)
class CoSchedulerConfig:
    target_ttft_ms: float = 500.0
    max_tokens_in_flight: int = 8192
    # A step's sequences enter the engine in chunks of about this many tokens; the budget never drops below
    # `min_chunks_in_flight` chunks, so ZO keeps trickling next to users. A user arriving waits behind at
    # most the budget.
    chunk_tokens: int = 128
    # Rounds run when something changes; this idle tick only lets stale latency samples age out.
    round_interval_s: float = 0.25
    ttft_window_s: float = 5.0
    fairness_max_lead_tokens: float = 0.0  # virtual-time lead a job may take over the slowest (0: strict)
    hold_chunks_while_users_wait: bool = True

    # The budget's floor, in chunks: two keep one chunk in the forward while the next waits in vLLM's queue,
    # so even at the floor every forward can carry one chunk (one chunk alone idles every other forward).
    # The service runs with a deeper floor (Settings.coscheduler_min_chunks_in_flight, 16): behind the
    # engine's per-step gate the floor only decides how many admitted probes wait for the gate to take.
    min_chunks_in_flight: int = 2
    # With a value, the latency controller also drives the engine's per-step probe cap next to users
    # (engine/gate_cap.py, scheduler/probe_cap_control.py), never below this many tokens (32: about one probe
    # request per step). None (default): the engine's static step gate alone. Measured (results/coserve.md,
    # session 7): at a target of 1.2 x the users-alone p95 the cap sits at 32 and ZO nearly stops.
    min_probe_tokens_per_step: int | None = None

    def controller(self) -> ControllerConfig:
        floor = min(self.min_chunks_in_flight * self.chunk_tokens, self.max_tokens_in_flight)
        return ControllerConfig(
            target_ttft_ms=self.target_ttft_ms,
            max_tokens_in_flight=self.max_tokens_in_flight,
            min_tokens_in_flight=floor,
            initial_tokens_in_flight=max(floor, min(self.max_tokens_in_flight, 4 * self.chunk_tokens)),
        )


@dataclass(frozen=True)
class CoSchedulerSnapshot:
    num_probe_slots: int
    num_steps_waiting: int
    num_steps_in_flight: int
    num_user_waiting: int
    num_user_running: int
    ttft_p95_ms: float | None
    num_probe_tokens_in_flight: int = 0
    num_chunks_waiting: int = 0
