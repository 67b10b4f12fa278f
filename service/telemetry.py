"""Wiring ZoMetrics to the app: the runtime observer, the HTTP middleware, the gauge refresher, /metrics.

The catalogue itself (names, buckets, label rules) is `service.metrics`; this module only feeds it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator

from fastapi import APIRouter, Request, Response
from prometheus_client import REGISTRY, CollectorRegistry
from prometheus_client.exposition import generate_latest
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from scheduler.jobs import EvalMetric, JobStatus, StepMetric
from service.auth import MetricsAccess
from service.metrics import ZoMetrics

log = logging.getLogger("zoserve")


class MetricsObserver:
    """The runtime's observer (scheduler.runtime.RuntimeObserver): step-loop events → ZoMetrics.

    Called from the step loop, so it must never raise: a metrics bug must not fail a training job."""

    def __init__(self, metrics: ZoMetrics) -> None:
        self.metrics = metrics

    def on_step(self, adapter: str, metric: StepMetric) -> None:
        with _quiet("on_step"):
            self.metrics.observe_zo_step(
                adapter,
                duration_s=metric.duration_s,
                num_probe_sequences=metric.num_sequences,
                num_scored_tokens=metric.num_tokens,
                loss=metric.loss,
                projected_gradient_abs=metric.projected_grad_norm,
            )
            self.metrics.count_tokens("train", metric.num_tokens)

    def on_eval(self, adapter: str, metric: EvalMetric) -> None:
        with _quiet("on_eval"):
            if metric.accuracy is not None:
                self.metrics.set_eval_accuracy(adapter, metric.accuracy)

    def on_commit(self, adapter: str, version: int) -> None:
        with _quiet("on_commit"):
            self.metrics.count_version_committed(adapter)

    def on_job_status(self, job_id: str, adapter: str, status: JobStatus) -> None:
        with _quiet("on_job_status"):
            if JobStatus(status).is_final:
                self.metrics.end_training(adapter)


class _quiet:
    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, exc, tb) -> bool:
        if exc is not None and isinstance(exc, Exception):
            log.warning("metrics observer %s failed: %s: %s", self.what, kind.__name__, exc)
            return True
        return False


RECEIVED_AT_KEY = "zoserve_received_s"  # scope["state"] key: time.perf_counter() when the app first saw the request


def received_at(scope: Scope) -> float | None:
    """When HttpMetricsMiddleware saw the request (perf_counter), for stages that start at the HTTP layer."""
    return scope.get("state", {}).get(RECEIVED_AT_KEY)


class HttpMetricsMiddleware:
    """Counts every HTTP request by matched route template (never the raw path) and status class, and stamps
    when the app first saw it (`received_at`: time to first token's `request_in` stage starts there)."""

    def __init__(self, app: ASGIApp, metrics: ZoMetrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})[RECEIVED_AT_KEY] = time.perf_counter()
        status = [500]

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            route = scope.get("route")
            self.metrics.observe_http_request(getattr(route, "path", "other"), status[0])


class _VllmOnly:
    """The families vLLM registered on prometheus_client's global registry (`vllm:*`), nothing else."""

    def collect(self) -> Iterator:
        for family in REGISTRY.collect():
            if family.name.startswith("vllm:"):
                yield family


def exposition(metrics: ZoMetrics) -> bytes:
    return metrics.exposition() + generate_latest(_VllmOnly())  # type: ignore[arg-type]


router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
async def prometheus_metrics(request: Request, _: MetricsAccess) -> Response:
    metrics: ZoMetrics = request.app.state.metrics
    return Response(exposition(metrics), media_type=metrics.content_type)


def refresh_gauges(app_state) -> None:
    """Copy the runtime's point-in-time state into the gauges (one snapshot, from the event loop)."""
    runtime, metrics = app_state.runtime, app_state.metrics
    metrics.set_jobs_by_state({status.value: n for status, n in runtime.job_counts().items()})
    # Engine-side figures (slots, queues, co-scheduler budget) come from the runtime when it exposes them.
    stats_fn = getattr(runtime, "stats", None)
    if stats_fn is None:
        metrics.set_queue_depths(user_waiting=0, user_running=app_state.inflight_generations[0], zo_waiting=0,
                                 zo_inflight=0)
        return
    stats = stats_fn()
    metrics.set_lora_slots(
        probe=stats.slots_probe, serving=stats.slots_serving, pinned_version=stats.slots_pinned, free=stats.slots_free
    )
    metrics.set_queue_depths(
        user_waiting=stats.user_waiting,
        # The engine's count when the runtime knows it, else the generations this app has in flight.
        user_running=max(stats.user_running, app_state.inflight_generations[0]),
        zo_waiting=stats.zo_waiting,
        zo_inflight=stats.zo_inflight,
    )
    # Probe tokens in flight are not exported: chunks live for milliseconds, a gauge read every second
    # would show noise. The train share of engine tokens (zoserve_engine_tokens_total) carries that.
    metrics.set_cosched_detail(budget_reason=stats.budget_reason, job_token_shares=dict(stats.job_token_shares))
    if stats.train_budget_tokens is not None:
        metrics.set_cosched(
            train_budget_tokens=stats.train_budget_tokens,
            user_latency_s=stats.user_latency_s or 0.0,
            target_latency_s=stats.target_latency_s or 0.0,
        )


async def refresh_forever(app_state, interval_s: float) -> None:
    while True:
        try:
            refresh_gauges(app_state)
        except Exception:  # never let a gauge bug take the refresher down for good
            log.exception("metrics refresh failed")
        await asyncio.sleep(interval_s)


def new_metrics(route_templates: list[str]) -> ZoMetrics:
    """A fresh registry per app: several apps in one process (tests, restarts) never share series."""
    return ZoMetrics(
        CollectorRegistry(), job_states=[s.value for s in JobStatus], routes=[*route_templates, "/metrics"]
    )


