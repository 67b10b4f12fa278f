"""The Prometheus metrics catalogue: every series zoserve exports, in one class.

One `ZoMetrics` per app, over the app's own `CollectorRegistry` (no module-level collectors, so tests and
several apps in one process never collide). The step loop, the co-scheduler and the routes call its typed
methods; `/metrics` returns `exposition()`.

Naming: `zoserve_<noun>_<unit>`, `_total` on counters and only on counters, base units (seconds), see
`check_metric_names`. Label values are bounded: adapter names (created by admins) and small fixed enums.
Versions, seeds and job ids never become labels; a job is identified by the adapter it trains.

User-request latency histograms are labelled by `adapter_class` (base | adapter | pinned_version), not by
adapter name: each label value of a histogram costs one series per bucket, so a per-name label would scale
the bucket series with the number of adapters admins create, while the question the dashboards answer —
does ZO training on the shared engine hurt user latency, and for which kind of request — only needs the
class. Per-adapter counts stay available on the training side, where a label per trained adapter is cheap.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Final, Literal

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

from scheduler.planning import BudgetReason

__all__ = [
    "ADAPTER_CLASSES",
    "CONTENT_TYPE_LATEST",
    "DEFAULT_JOB_STATES",
    "DEFAULT_ROUTES",
    "LATENCY_BUCKETS_S",
    "METRIC_NAMES",
    "QUEUES",
    "SLOT_USES",
    "STEP_BUCKETS_S",
    "TOKEN_CLASSES",
    "TTFT_STAGES",
    "ZoMetrics",
    "check_metric_names",
    "registered_families",
]

AdapterClass = Literal["base", "adapter", "pinned_version"]
TokenClass = Literal["serve", "train"]

ADAPTER_CLASSES: Final = ("base", "adapter", "pinned_version")
TOKEN_CLASSES: Final = ("serve", "train")
SLOT_USES: Final = ("probe", "serving", "pinned_version", "free")
BUDGET_REASONS: Final = tuple(reason.value for reason in BudgetReason)
QUEUES: Final = ("user_waiting", "user_running", "zo_waiting", "zo_inflight")
TTFT_STAGES: Final = ("request_in", "handler", "to_engine", "engine_wait", "first_forward", "to_service")
DEFAULT_JOB_STATES: Final = ("pending", "running", "paused", "succeeded", "failed", "cancelled")
# Route templates, never raw paths: a path label would be unbounded (scanners, typos, adapter names in URLs).
DEFAULT_ROUTES: Final = (
    "/v1/completions",
    "/v1/chat/completions",
    "/v1/models",
    "/v1/jobs",
    "/v1/jobs/{job_id}",
    "/v1/adapters",
    "/v1/adapters/{name}",
    "/healthz",
    "/readyz",
    "/metrics",
)
OTHER_ROUTE: Final = "other"

# User latency on CPU (tiny model) is tens of ms to seconds; on GPU a few ms to tens of seconds for long
# generations. Roughly 2.5x apart, 5 ms .. 60 s.
LATENCY_BUCKETS_S: Final = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0)
# The stages of one TTFT are a forward or an IPC hop: milliseconds.
STAGE_BUCKETS_S: Final = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
# One ZO step (2q x B scoring sequences + update + commit): ~10 ms on GPU for tiny adapters, minutes on CPU
# for the OPT-125m shape.
STEP_BUCKETS_S: Final = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 60.0, 120.0, 300.0)

# Every exported family: name -> (type, label names). Tests check dashboards only reference these.
METRIC_NAMES: Final[Mapping[str, tuple[str, tuple[str, ...]]]] = {
    "zoserve_zo_steps_total": ("counter", ("adapter",)),
    "zoserve_zo_step_duration_seconds": ("histogram", ("adapter",)),
    "zoserve_zo_probe_sequences_total": ("counter", ("adapter",)),
    "zoserve_zo_scored_tokens_total": ("counter", ("adapter",)),
    "zoserve_zo_loss_nats": ("gauge", ("adapter",)),
    "zoserve_zo_projected_gradient_nats": ("gauge", ("adapter",)),
    "zoserve_eval_accuracy_ratio": ("gauge", ("adapter",)),
    "zoserve_adapter_versions_total": ("counter", ("adapter",)),
    "zoserve_engine_tokens_total": ("counter", ("class",)),
    "zoserve_training_jobs": ("gauge", ("state",)),
    "zoserve_http_requests_total": ("counter", ("route", "code_class")),
    "zoserve_request_ttft_seconds": ("histogram", ("adapter_class",)),
    "zoserve_request_ttft_stage_seconds": ("histogram", ("stage",)),
    "zoserve_request_duration_seconds": ("histogram", ("adapter_class",)),
    "zoserve_cosched_train_budget_tokens": ("gauge", ()),
    "zoserve_cosched_user_latency_seconds": ("gauge", ()),
    "zoserve_cosched_user_latency_target_seconds": ("gauge", ()),
    "zoserve_cosched_budget_reason_info": ("gauge", ("reason",)),
    "zoserve_cosched_job_token_share_ratio": ("gauge", ("adapter",)),
    "zoserve_lora_slots": ("gauge", ("use",)),
    "zoserve_queue_requests": ("gauge", ("queue",)),
}

# The last word of a name (before `_total`) is its unit. Count-like units name what is counted.
_UNITS: Final = frozenset(
    {"seconds", "bytes", "ratio", "nats", "tokens", "requests", "sequences", "steps", "versions", "jobs",
     "slots", "info"}
)
_NON_BASE_UNITS: Final = frozenset(
    {"ms", "milliseconds", "microseconds", "us", "minutes", "hours", "days", "kilobytes", "megabytes",
     "percent", "count", "sum", "bucket"}
)
_NAME_RE: Final = re.compile(r"^zoserve_[a-z][a-z0-9]*(_[a-z0-9]+)*$")


def check_metric_names(families: Mapping[str, str]) -> list[str]:
    """Problems with metric family names (name -> type: counter|gauge|histogram); empty when all conform."""
    problems: list[str] = []
    for name, kind in sorted(families.items()):
        if not _NAME_RE.match(name):
            problems.append(f"{name}: not zoserve_<noun>_<unit> in snake_case")
            continue
        is_total = name.endswith("_total")
        if kind == "counter" and not is_total:
            problems.append(f"{name}: counter must end in _total")
        if kind != "counter" and is_total:
            problems.append(f"{name}: only counters end in _total")
        words = name.removesuffix("_total").split("_")
        unit = words[-1]
        if len(words) < 3:
            problems.append(f"{name}: needs a noun and a unit after zoserve_")
        if unit in _NON_BASE_UNITS or any(w in _NON_BASE_UNITS for w in words[1:]):
            problems.append(f"{name}: use base units (seconds, bytes, ratio), not {unit}")
        elif unit not in _UNITS:
            problems.append(f"{name}: unit {unit!r} is not one of {sorted(_UNITS)}")
        if kind == "histogram" and unit not in {"seconds", "bytes", "tokens", "ratio"}:
            problems.append(f"{name}: histogram unit should be seconds/bytes/tokens/ratio")
    return problems


def _code_class(status_code: int) -> str:
    if not 100 <= status_code <= 599:
        raise ValueError(f"status_code: {status_code} is not an HTTP status")
    return f"{status_code // 100}xx"


def _check_enum(field: str, value: str, allowed: Iterable[str]) -> str:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{field}: {value!r} is not one of {allowed}")
    return value


class ZoMetrics:
    """All zoserve metrics, registered on `registry`. Methods are cheap and thread-safe (prometheus_client)."""

    def __init__(
        self,
        registry: CollectorRegistry,
        *,
        job_states: Iterable[str] = DEFAULT_JOB_STATES,
        routes: Iterable[str] = DEFAULT_ROUTES,
    ) -> None:
        self.registry = registry
        self.job_states = tuple(job_states)
        self.routes = frozenset(routes)
        r = registry
        # --- ZO training, per adapter being trained
        self._zo_steps = Counter("zoserve_zo_steps_total", "ZO steps completed.", ["adapter"], registry=r)
        self._zo_step_duration = Histogram(
            "zoserve_zo_step_duration_seconds",
            "Wall time of one ZO step: probe writes, scoring, update and commit.",
            ["adapter"],
            buckets=STEP_BUCKETS_S,
            registry=r,
        )
        self._zo_probe_sequences = Counter(
            "zoserve_zo_probe_sequences_total", "Scoring sequences submitted for ZO probes.", ["adapter"], registry=r
        )
        self._zo_scored_tokens = Counter(
            "zoserve_zo_scored_tokens_total", "Prompt tokens scored for ZO probes.", ["adapter"], registry=r
        )
        self._zo_loss = Gauge(
            "zoserve_zo_loss_nats", "Training loss of the last step (mean label NLL, nats).", ["adapter"], registry=r
        )
        self._zo_projected_gradient = Gauge(
            "zoserve_zo_projected_gradient_nats",
            "Mean |(L+ - L-) / 2eps| over the last step's directions.",
            ["adapter"],
            registry=r,
        )
        self._eval_accuracy = Gauge(
            "zoserve_eval_accuracy_ratio", "Accuracy of the last evaluation, 0..1.", ["adapter"], registry=r
        )
        self._adapter_versions = Counter(
            "zoserve_adapter_versions_total", "Adapter versions committed to the store.", ["adapter"], registry=r
        )
        # --- engine share
        self._engine_tokens = Counter(
            "zoserve_engine_tokens_total",
            "Tokens processed by the engine, by class (serve = user traffic, train = ZO scoring).",
            ["class"],
            registry=r,
        )
        self._jobs = Gauge("zoserve_training_jobs", "Training jobs by state.", ["state"], registry=r)
        # --- data plane
        self._requests = Counter(
            "zoserve_http_requests_total", "HTTP requests by route template and status class.", ["route", "code_class"],
            registry=r,
        )
        self._ttft = Histogram(
            "zoserve_request_ttft_seconds",
            "User request time to first token.",
            ["adapter_class"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        self._ttft_stage = Histogram(
            "zoserve_request_ttft_stage_seconds",
            "Where user time to first token goes: request_in (the app sees the request to the completion handler "
            "starts: body, validation, auth), handler (to submission), to_engine (into vLLM's queue), "
            "engine_wait (queued to first scheduled), first_forward (scheduled to first token), to_service (back).",
            ["stage"],
            buckets=STAGE_BUCKETS_S,
            registry=r,
        )
        self._request_duration = Histogram(
            "zoserve_request_duration_seconds",
            "User request end-to-end latency, arrival to last token.",
            ["adapter_class"],
            buckets=LATENCY_BUCKETS_S,
            registry=r,
        )
        # --- co-scheduler
        self._cosched_budget = Gauge(
            "zoserve_cosched_train_budget_tokens", "Tokens per engine step the co-scheduler grants to ZO scoring.",
            registry=r,
        )
        self._cosched_latency = Gauge(
            "zoserve_cosched_user_latency_seconds", "User latency the co-scheduler measured over its window.",
            registry=r,
        )
        self._cosched_target = Gauge(
            "zoserve_cosched_user_latency_target_seconds", "User latency the co-scheduler steers towards.",
            registry=r,
        )
        self._cosched_reason = Gauge(
            "zoserve_cosched_budget_reason_info", "1 for the controller's latest budget decision, 0 for the others.",
            ["reason"], registry=r,
        )
        self._share_adapters: set[str] = set()
        self._cosched_share = Gauge(
            "zoserve_cosched_job_token_share_ratio", "A training job's recent share of granted scoring tokens.",
            ["adapter"], registry=r,
        )
        self._lora_slots = Gauge("zoserve_lora_slots", "Engine LoRA slots by use.", ["use"], registry=r)
        self._queue = Gauge("zoserve_queue_requests", "Engine requests per queue.", ["queue"], registry=r)
        # Fixed-enum gauges start at zero so dashboards show every series from the first scrape.
        for state in self.job_states:
            self._jobs.labels(state=state).set(0)
        for use in SLOT_USES:
            self._lora_slots.labels(use=use).set(0)
        for reason in BUDGET_REASONS:
            self._cosched_reason.labels(reason=reason).set(0)
        for queue in QUEUES:
            self._queue.labels(queue=queue).set(0)
        for token_class in TOKEN_CLASSES:
            self._engine_tokens.labels(**{"class": token_class})

    # ---- ZO training (step loop)

    def observe_zo_step(
        self,
        adapter: str,
        *,
        duration_s: float,
        num_probe_sequences: int,
        num_scored_tokens: int,
        loss: float,
        projected_gradient_abs: float | None = None,
    ) -> None:
        """One finished ZO step of the job training `adapter`."""
        self._zo_steps.labels(adapter=adapter).inc()
        self._zo_step_duration.labels(adapter=adapter).observe(duration_s)
        self._zo_probe_sequences.labels(adapter=adapter).inc(num_probe_sequences)
        self._zo_scored_tokens.labels(adapter=adapter).inc(num_scored_tokens)
        self._zo_loss.labels(adapter=adapter).set(loss)
        if projected_gradient_abs is not None:
            self._zo_projected_gradient.labels(adapter=adapter).set(projected_gradient_abs)

    def count_version_committed(self, adapter: str) -> None:
        """A new version of `adapter` was committed to the store (by a step, an import or a rollback)."""
        self._adapter_versions.labels(adapter=adapter).inc()

    def set_eval_accuracy(self, adapter: str, accuracy: float) -> None:
        if not 0.0 <= accuracy <= 1.0:
            raise ValueError(f"accuracy: {accuracy} is not in [0, 1]")
        self._eval_accuracy.labels(adapter=adapter).set(accuracy)

    def end_training(self, adapter: str) -> None:
        """The job on `adapter` ended: drop its point-in-time gauges so no stale loss stays on the dashboard.

        Counters and the step histogram are kept (they are cumulative; rate() of them falls to zero)."""
        for gauge in (self._zo_loss, self._zo_projected_gradient, self._eval_accuracy):
            _remove_quietly(gauge, adapter)

    def forget_adapter(self, adapter: str) -> None:
        """`adapter` was deleted: drop every series labelled with it."""
        self.end_training(adapter)
        for metric in (self._zo_steps, self._zo_step_duration, self._zo_probe_sequences, self._zo_scored_tokens,
                       self._adapter_versions):
            _remove_quietly(metric, adapter)

    # ---- engine share and jobs

    def count_tokens(self, token_class: TokenClass, num_tokens: int) -> None:
        """Tokens the engine processed for user traffic (serve) or ZO scoring (train)."""
        _check_enum("token_class", token_class, TOKEN_CLASSES)
        if num_tokens < 0:
            raise ValueError(f"num_tokens: {num_tokens} < 0")
        self._engine_tokens.labels(**{"class": token_class}).inc(num_tokens)

    def set_jobs_by_state(self, num_jobs_by_state: Mapping[str, int]) -> None:
        """A full snapshot: states missing from the mapping are set to 0."""
        for state in num_jobs_by_state:
            _check_enum("state", state, self.job_states)
        for state in self.job_states:
            self._jobs.labels(state=state).set(num_jobs_by_state.get(state, 0))

    # ---- data plane (routes / middleware)

    def observe_http_request(self, route: str, status_code: int) -> None:
        """Any HTTP request; `route` is the matched route template (e.g. `/v1/jobs/{job_id}`), not the path."""
        route = route if route in self.routes else OTHER_ROUTE
        self._requests.labels(route=route, code_class=_code_class(status_code)).inc()

    def observe_user_request(
        self, adapter_class: AdapterClass, *, duration_s: float, ttft_s: float | None = None
    ) -> None:
        """A finished generation request. `ttft_s` is None when no token was produced (error, cancel)."""
        _check_enum("adapter_class", adapter_class, ADAPTER_CLASSES)
        if ttft_s is not None:
            self._ttft.labels(adapter_class=adapter_class).observe(ttft_s)
        self._request_duration.labels(adapter_class=adapter_class).observe(duration_s)

    def observe_ttft_stages(self, stages_s: Mapping[str, float], request_id: str | None = None) -> None:
        """One user request's time to first token, split into TTFT_STAGES. `request_id` (the completion's `id`)
        is not a label (unbounded); it is there for a hook that follows single requests (bench/coserve.py)."""
        for stage, seconds in stages_s.items():
            _check_enum("stage", stage, TTFT_STAGES)
            self._ttft_stage.labels(stage=stage).observe(max(0.0, seconds))

    # ---- co-scheduler and engine state (once per planning round)

    def set_cosched(self, *, train_budget_tokens: int, user_latency_s: float, target_latency_s: float) -> None:
        self._cosched_budget.set(train_budget_tokens)
        self._cosched_latency.set(user_latency_s)
        self._cosched_target.set(target_latency_s)

    def set_cosched_detail(self, *, budget_reason: str | None, job_token_shares: Mapping[str, float]) -> None:
        for reason in BUDGET_REASONS:
            self._cosched_reason.labels(reason=reason).set(1 if reason == budget_reason else 0)
        for adapter in self._share_adapters - set(job_token_shares):  # jobs that ended: drop their series
            _remove_quietly(self._cosched_share, adapter)
        for adapter, share in job_token_shares.items():
            self._cosched_share.labels(adapter=adapter).set(share)
        self._share_adapters = set(job_token_shares)

    def set_lora_slots(self, *, probe: int, serving: int, pinned_version: int, free: int) -> None:
        for use, num_slots in zip(SLOT_USES, (probe, serving, pinned_version, free), strict=True):
            self._lora_slots.labels(use=use).set(num_slots)

    def set_queue_depths(self, *, user_waiting: int, user_running: int, zo_waiting: int, zo_inflight: int) -> None:
        for queue, depth in zip(QUEUES, (user_waiting, user_running, zo_waiting, zo_inflight), strict=True):
            self._queue.labels(queue=queue).set(depth)

    # ---- exposition

    def exposition(self) -> bytes:
        """The registry in the Prometheus text format; serve with `CONTENT_TYPE_LATEST`."""
        return generate_latest(self.registry)

    content_type: Final = CONTENT_TYPE_LATEST


def _remove_quietly(metric: Counter | Gauge | Histogram, adapter: str) -> None:
    try:
        metric.remove(adapter)
    except KeyError:
        pass


def registered_families(registry: CollectorRegistry) -> dict[str, str]:
    """Family name -> type for everything on `registry`, counters with their `_total` suffix."""
    families: dict[str, str] = {}
    for family in registry.collect():
        name = f"{family.name}_total" if family.type == "counter" else family.name
        families[name] = family.type
    return families
