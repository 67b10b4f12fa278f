"""The runtime facade: jobs (create, pause, resume, cancel, events, metrics), adapters and serving leases.

One asyncio task per active job runs its steps back to back (`scheduler.job_runner`); the engine batches the
probe sequences of all jobs together, next to user requests that carry a better priority. The adapter store
holds every version; the job journal lets a restarted runtime resume the jobs that were active.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from adapters_store import AdapterNotFound, AdapterStore, RecordKind, parse_address
from scheduler.adapter_host import AdapterHost, SlotPool
from scheduler.coscheduler import CoScheduler, CoSchedulerConfig
from scheduler.engine.binding import EngineBinding
from scheduler.errors import AdapterBusy, InvalidJobSpec, JobNotFound, JobStateConflict
from scheduler.job_artifacts import has_artifacts, validate_artifacts
from scheduler.job_journal import JobJournal
from scheduler.job_runner import JobRun, method_hyper, probe_slots_needed, run_job
from scheduler.jobs import (
    AdapterView, EvalMetric, JobEvent, JobSpec, JobStatus, JobView, MetricsPage, StepMetric, VersionView, metrics_page,
)
from scheduler.objectives import ClassificationObjective, LabelledText, PromptCompletion
from scheduler.probe_cap_control import ProbeCapControl
from scheduler.rewards import RewardObjective, words
from scheduler.serving import ServingLease
from scheduler.zo.methods import REGISTRY

log = logging.getLogger(__name__)


class RuntimeObserver(Protocol):
    def on_step(self, adapter: str, metric: StepMetric) -> None: ...
    def on_eval(self, adapter: str, metric: EvalMetric) -> None: ...
    def on_commit(self, adapter: str, version: int) -> None: ...
    def on_job_status(self, job_id: str, adapter: str, status: JobStatus) -> None: ...


class NullObserver:
    def on_step(self, adapter: str, metric: StepMetric) -> None: ...
    def on_eval(self, adapter: str, metric: EvalMetric) -> None: ...
    def on_commit(self, adapter: str, version: int) -> None: ...
    def on_job_status(self, job_id: str, adapter: str, status: JobStatus) -> None: ...


@dataclass(frozen=True)
class RuntimeStats:
    """Point-in-time gauges for metrics: slots by use, queues, and the co-scheduler's controller."""

    slots_probe: int
    slots_serving: int
    slots_pinned: int  # slots holding an exact `name@version`
    slots_free: int
    user_waiting: int  # user requests without a first token yet
    user_running: int
    zo_waiting: int  # steps waiting for a grant
    zo_inflight: int  # steps granted and running
    train_budget_tokens: int | None
    user_latency_s: float | None  # the measured TTFT p95 the controller acts on
    target_latency_s: float
    budget_reason: str | None = None  # the controller's last decision (BudgetReason value)
    job_token_shares: tuple[tuple[str, float], ...] = ()  # (adapter, recent share of granted scoring tokens)


def _validate_reward(spec: JobSpec, max_model_len: int) -> None:
    if spec.objective.max_new_tokens > max_model_len // 2:
        raise InvalidJobSpec("objective.max_new_tokens", f"must be <= {max_model_len // 2} (half the engine's max_model_len)")
    for field_name, examples in (("training_data", spec.examples), ("validation_data", spec.eval_examples)):
        for index, example in enumerate(examples):
            if not words(example.completion):
                raise InvalidJobSpec(f"{field_name}.{index}.completion", "the reference answer has no word to match")


def _require_active(run: JobRun, action: str) -> None:
    if run.status.is_final:
        raise JobStateConflict(f"cannot {action} job {run.id}: it is {run.status.value}")


class Runtime:
    def __init__(
        self,
        binding: EngineBinding,
        store: AdapterStore,
        journal_dir: Path,
        *,
        observer: RuntimeObserver | None = None,
        coscheduling: CoSchedulerConfig | None = None,
        pipelined_commits: bool = True,
    ):
        self.binding = binding
        # Jobs score a step while the one before it is committed; False: each commit ends first. Read at every
        # step, so a benchmark may switch it on a running service.
        self.pipelined_commits = pipelined_commits
        self.store = store
        self.observer = observer or NullObserver()
        self.slots = SlotPool(binding.slot_ids)
        self.host = AdapterHost(binding, store, self.slots)
        coscheduling = coscheduling or CoSchedulerConfig()
        self.coscheduler = CoScheduler(
            coscheduling, self.slots, binding.slot_ids, self.host.serving_slots, self.host.reclaim_slot,
            probe_cap=_probe_cap_control(binding, coscheduling),
        )
        self.journal = JobJournal(journal_dir)
        self._jobs: dict[str, JobRun] = {}

    # ----------------------------------------------------------------- lifecycle
    async def start(self) -> None:
        """Start the co-scheduler; resume the jobs a previous runtime left active, each from its adapter's head."""
        self.coscheduler.start()
        for job_id, spec, progress in self.journal.load_all():
            run = JobRun(job_id, spec, progress.created_at, start_version=progress.start_version)
            run.step, run.last_loss, run.error, run.status = progress.step, progress.last_loss, progress.error, progress.status
            self._jobs[job_id] = run
            if progress.status.is_final:
                continue
            paused = progress.status is JobStatus.PAUSED
            run.resume_requested = not paused
            run.event("status", f"resumed after restart at step {progress.step}")
            self._launch(run)

    async def shutdown(self) -> None:
        """Stop job tasks without marking them cancelled, so a restart resumes them."""
        tasks = [run.task for run in self._jobs.values() if run.task is not None and not run.task.done()]
        for run in self._jobs.values():
            run.stopping_for_shutdown = True
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.coscheduler.stop()
        await asyncio.to_thread(self.journal.flush)  # a restart resumes from the last progress saved

    def _launch(self, run: JobRun) -> None:
        run.task = asyncio.create_task(run_job(self, run), name=f"zo-job-{run.id}")

    # ----------------------------------------------------------------- jobs
    def _validate(self, spec: JobSpec) -> None:
        config = self.binding.config
        hyper = method_hyper(spec)
        if spec.method == "lozo-bank" and hyper.rank >= spec.lora.rank:  # the bank needs columns beside the window
            raise InvalidJobSpec("method_params.rank", f"lozo-bank needs rank < lora.rank ({spec.lora.rank})")
        if spec.method not in REGISTRY:
            raise InvalidJobSpec("method", f"{spec.method!r} is not one of {sorted(REGISTRY)}")
        if spec.lora.rank > config.max_lora_rank:
            raise InvalidJobSpec("lora.rank", f"must be <= the engine's max_lora_rank {config.max_lora_rank}")
        unknown = set(spec.lora.target_modules) - set(config.target_modules)
        if unknown:
            raise InvalidJobSpec("lora.target_modules", f"{sorted(unknown)} not enabled in the engine {list(config.target_modules)}")
        needed = probe_slots_needed(spec) + 2
        if needed > self.slots.num_slots:
            raise InvalidJobSpec(
                "hyperparameters.num_directions", f"needs {needed} LoRA slots, the engine has {self.slots.num_slots}"
            )
        if not spec.examples:
            raise InvalidJobSpec("training_data", "no examples")
        if spec.batch_size < 1 or spec.max_steps < 1:
            raise InvalidJobSpec("hyperparameters.batch_size", "batch_size and max_steps must be >= 1")
        classification = isinstance(spec.objective, ClassificationObjective)
        example_type = LabelledText if classification else PromptCompletion
        for field_name, examples in (("training_data", spec.examples), ("validation_data", spec.eval_examples)):
            if any(not isinstance(e, example_type) for e in examples):
                raise InvalidJobSpec(field_name, f"rows must be {example_type.__name__} for this objective")
            if classification and any(not 0 <= e.label < len(spec.objective.options) for e in examples):
                raise InvalidJobSpec(f"{field_name}.label", f"labels must be in [0, {len(spec.objective.options)})")
        if isinstance(spec.objective, RewardObjective):
            _validate_reward(spec, config.max_model_len)
        if any(r.spec.adapter == spec.adapter and not r.status.is_final for r in self._jobs.values()):
            raise AdapterBusy(f"adapter {spec.adapter!r} already has an active job")

    async def create_job(self, spec: JobSpec) -> JobView:
        self._validate(spec)
        if has_artifacts(spec):
            validate_artifacts(spec, method_hyper(spec), await self.host.layout(spec.lora))
        try:
            meta = await self.store.get_adapter(spec.adapter)
            if (meta.rank, meta.alpha, tuple(sorted(meta.target_modules))) != (
                spec.lora.rank, spec.lora.alpha, tuple(sorted(spec.lora.target_modules))
            ):
                raise InvalidJobSpec("lora", f"adapter {spec.adapter!r} exists with rank {meta.rank}, alpha {meta.alpha}, targets {list(meta.target_modules)}")
        except AdapterNotFound:
            pass
        run = JobRun(f"job-{uuid.uuid4().hex[:12]}", spec, time.time())
        self._jobs[run.id] = run
        run.event("status", "validating")
        await asyncio.to_thread(self.journal.save_spec, run.id, spec)
        run.set_status(JobStatus.QUEUED, self)
        self._launch(run)
        return self.job(run.id)

    def _get(self, job_id: str) -> JobRun:
        run = self._jobs.get(job_id)
        if run is None:
            raise JobNotFound(job_id)
        return run

    def job(self, job_id: str) -> JobView:
        return self._get(job_id).view(self._head_version(self._get(job_id).spec.adapter))

    def jobs(self, offset: int = 0, limit: int = 100) -> list[JobView]:
        runs = sorted(self._jobs.values(), key=lambda r: r.created_at)[offset : offset + limit]
        return [r.view(self._head_version(r.spec.adapter)) for r in runs]

    def job_counts(self) -> dict[JobStatus, int]:
        counts = {status: 0 for status in JobStatus}
        for run in self._jobs.values():
            counts[run.status] += 1
        return counts

    def _head_version(self, adapter: str) -> int:
        loaded = self.host.loaded.get(adapter)
        return loaded.head if loaded else 0

    def job_events(self, job_id: str, after_seq: int = 0) -> list[JobEvent]:
        return [e for e in self._get(job_id).events if e.seq > after_seq]

    def job_metrics(self, job_id: str, after_step: int = 0, limit: int = 1000) -> MetricsPage:
        run = self._get(job_id)
        return metrics_page(run.step_metrics, run.eval_metrics, after_step, limit)

    def pause(self, job_id: str) -> JobView:
        run = self._get(job_id)
        _require_active(run, "pause")
        if run.status in (JobStatus.RUNNING, JobStatus.QUEUED):
            run.resume_requested = False
            run.resume.clear()
            run.set_status(JobStatus.PAUSED, self)
        return self.job(job_id)

    def resume(self, job_id: str) -> JobView:
        run = self._get(job_id)
        _require_active(run, "resume")
        if run.status is JobStatus.PAUSED:
            run.resume_requested = True
            run.resume.set()
            run.set_status(JobStatus.RUNNING if run.started else JobStatus.QUEUED, self)
        return self.job(job_id)

    async def cancel(self, job_id: str) -> JobView:
        run = self._get(job_id)
        _require_active(run, "cancel")
        if not run.status.is_final and run.task is not None:
            run.task.cancel()
            await asyncio.gather(run.task, return_exceptions=True)
        return self.job(job_id)

    async def append_examples(self, adapter: str, examples: Sequence[LabelledText | PromptCompletion]) -> int:
        """Add examples to the stream the adapter's active job samples from; returns the stream's size."""
        run = next((r for r in self._jobs.values() if r.spec.adapter == adapter and not r.status.is_final), None)
        if run is None:
            raise JobNotFound(f"adapter {adapter!r} has no active job to feed")
        return await run.append_examples(self, examples)

    def stats(self) -> RuntimeStats:
        serving = self.host.serving_slots()
        pinned = sum(1 for _, owner, _ in serving if "@" in owner)
        co = self.coscheduler.snapshot()
        record = self.coscheduler.latest_record
        return RuntimeStats(
            slots_probe=co.num_probe_slots,
            slots_serving=len(serving) - pinned,
            slots_pinned=pinned,
            slots_free=self.slots.num_free,
            user_waiting=co.num_user_waiting,
            user_running=co.num_user_running,
            zo_waiting=co.num_steps_waiting,
            zo_inflight=co.num_steps_in_flight,
            train_budget_tokens=record.budget_tokens if record else self.coscheduler.initial_budget_tokens,
            user_latency_s=co.ttft_p95_ms / 1000.0 if co.ttft_p95_ms is not None else None,
            target_latency_s=self.coscheduler.config.target_ttft_ms / 1000.0,
            budget_reason=record.budget_reason if record else None,
            job_token_shares=tuple(
                (self._jobs[job.job_id].spec.adapter, job.recent_token_share)
                for job in (record.jobs if record else ())
                if job.job_id in self._jobs
            ),
        )

    # ----------------------------------------------------------------- adapters
    async def _adapter_view(self, name: str) -> AdapterView:
        meta = await self.store.get_adapter(name)
        active = next((r.id for r in self._jobs.values() if r.spec.adapter == name and not r.status.is_final), None)
        served = self.host.serving.live_version(name) if self.host.serving.is_registered(name) else None
        return AdapterView(
            meta.name, meta.base_model, meta.rank, meta.alpha, tuple(meta.target_modules), meta.head, served,
            active, meta.created_at,
        )

    async def adapters(self) -> list[AdapterView]:
        return [await self._adapter_view(name) for name in sorted(await self.store.list_adapters())]

    async def adapter(self, name: str) -> AdapterView:
        return await self._adapter_view(name)

    async def adapter_versions(self, name: str, offset: int = 0, limit: int = 100) -> list[VersionView]:
        meta = await self.store.get_adapter(name)
        snapshots = {s.version for s in await self.store.metadata.list_snapshots(name)}
        pins = set(await self.store.list_pins(name))
        first = max(1, offset)
        last = min(meta.head, offset + limit - 1)
        views = []
        if offset == 0:
            views.append(VersionView(0, None, 0, "initial", "", meta.created_at, 0 in snapshots, 0 in pins))
        if last >= first:
            for r in await self.store.list_records(name, first, last):
                kind = "rollback" if r.kind == RecordKind.ROLLBACK else "update"
                views.append(VersionView(r.version, r.parent, r.step, kind, r.optimizer, r.created_at, r.version in snapshots, r.version in pins))
        return views

    async def rollback(self, name: str, version: int) -> AdapterView:
        await self.host.rollback(name, version)
        return await self._adapter_view(name)

    async def export_adapter(self, name: str, version: int | str | None, out_dir: Path) -> Path:
        return await self.host.export(name, version, out_dir)

    # ----------------------------------------------------------------- serving
    async def served_models(self) -> list[str]:
        return sorted(await self.store.list_adapters())

    def user_request(self, num_prompt_tokens: int):
        """Wrap every user generation: `async with runtime.user_request(n) as r:` and call `r.first_token()`
        when the first token arrives. Its time-to-first-token is what the co-scheduler keeps within target."""
        return self.coscheduler.user_request(num_prompt_tokens)

    @asynccontextmanager
    async def lease(self, model: str) -> AsyncIterator[ServingLease]:
        """A slot for `name` (its latest published version) or `name@version` (exactly that version)."""
        name, version = parse_address(model)
        async with self.host.lease(name, version) as lease:
            yield lease


def _probe_cap_control(binding: EngineBinding, config: CoSchedulerConfig) -> ProbeCapControl | None:
    """The latency loop over the engine's per-step probe cap, when the engine has a step gate with a cap word."""
    gate = binding.config.step_gate
    if binding.gate_cap is None or gate is None or config.min_probe_tokens_per_step is None:
        return None
    return ProbeCapControl(
        config.target_ttft_ms, gate.tokens_with_users, config.min_probe_tokens_per_step, binding.gate_cap.write
    )
