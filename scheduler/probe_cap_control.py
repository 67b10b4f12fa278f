"""Closes the latency loop on the quantity that sets it: probe tokens per engine step next to users.

The co-scheduler's in-flight budget limits how much probe work is queued in the engine, but behind the engine's
per-step gate (planning/step_gate.py) the queue depth hardly touches user latency: what a user waits for is
the forward in flight, and its length is set by how many probe tokens the gate lets into each step. With a
static gate that length is fixed in tokens, so its cost in milliseconds moves with the machine (measured: the
same 256-token cap gave decode + probe steps of 11 and 16 ms on two days, results/coserve.md, session 7).

This runs the in-flight budget's AIMD rules (planning/controller.py: cut when users' TTFT p95 is over target,
clamp when a user waits long behind probes, grow while under target) over the per-step cap instead, between
`min_tokens` and the gate's static limit, and writes each new value to the engine's shared cap word
(engine/gate_cap.py), which vLLM's scheduler reads before every step. With users' latency under target the
cap stays at the static limit, so behaviour is unchanged until the target is at stake.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from scheduler.planning import ControllerConfig, ControllerState, LatencySignal, initial_controller_state, update_budget


class ProbeCapControl:
    def __init__(self, target_ttft_ms: float, max_tokens: int, min_tokens: int, write: Callable[[int], None]):
        self.config = ControllerConfig(
            target_ttft_ms=target_ttft_ms,
            max_tokens_in_flight=max_tokens,
            min_tokens_in_flight=min(min_tokens, max_tokens),
            initial_tokens_in_flight=max_tokens,
            additive_increase_tokens=max(1, max_tokens // 16),
            slow_start_factor=1.0,  # after a cut, grow back additively: the cap is already near its range
        )
        self.state: ControllerState = initial_controller_state(self.config)
        self._write = write
        self._written = self.state.budget_tokens
        write(self._written)

    @property
    def cap_tokens(self) -> int:
        return self.state.budget_tokens

    def set_target_ttft_ms(self, target_ttft_ms: float) -> None:
        self.config = dataclasses.replace(self.config, target_ttft_ms=target_ttft_ms)
        self.state = dataclasses.replace(self.state, target_ttft_ms=target_ttft_ms)

    def update(self, latency: LatencySignal, num_probe_tokens_in_flight: int, num_probe_tokens_wanted: int,
               now_s: float) -> int:
        """One control round with the co-scheduler's latency signal; writes the cap when it changes."""
        self.state = update_budget(
            self.config, self.state, latency, num_probe_tokens_in_flight, num_probe_tokens_wanted, now_s
        )
        if self.state.budget_tokens != self._written:
            self._written = self.state.budget_tokens
            self._write(self._written)
        return self._written
