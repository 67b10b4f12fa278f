"""One job's life: load its adapter, take probe slots, run steps, commit and publish each version, evaluate.

A job's state (`JobRun`) is mutated only by its own task and by the runtime's pause/resume/cancel; every
status change is an event, goes to the observer and is written to the journal.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from scheduler.engine.binding import PROBE_PRIORITY
from scheduler.engine_step import ChunkGate, run_engine_step, score_batches, work_tokens
from scheduler.errors import InvalidJobSpec, NoCapacity
from scheduler.job_artifacts import job_artifacts, method_and_wire
from scheduler.job_journal import JobProgress
from scheduler.jobs import EvalMetric, JobEvent, JobSpec, JobStatus, JobView, StepMetric, busy_s
from scheduler.objectives import EncodedDataset
from scheduler.rewards import EncodedReward, RewardObjective, words
from scheduler.zo.methods import InvalidHyperParameter, hyper_items, parse_hyper

if TYPE_CHECKING:
    from scheduler.adapter_host import LoadedAdapter, PendingCommit
    from scheduler.runtime import Runtime

log = logging.getLogger(__name__)
EVAL_CHUNK = 64  # eval sequences submitted at once
# Probe cache salts: one per scored step, unique for this process's engine, so that no step's probes read
# prefix KV computed under another step's states (a step scored again after a head conflict included).
_PROBE_SALTS = itertools.count()


@dataclass
class JobRun:
    id: str
    spec: JobSpec
    created_at: float
    start_version: int | None = None  # adapter head when the job first stepped
    status: JobStatus = JobStatus.VALIDATING
    step: int = 0
    last_loss: float | None = None
    error: str | None = None
    started: bool = False
    resume_requested: bool = True
    stopping_for_shutdown: bool = False
    data: EncodedDataset | None = None
    events: list[JobEvent] = field(default_factory=list)
    step_metrics: deque[StepMetric] = field(default_factory=lambda: deque(maxlen=100_000))
    eval_metrics: list[EvalMetric] = field(default_factory=list)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def __post_init__(self) -> None:
        self.resume.set()

    def event(self, kind: str, message: str) -> None:
        self.events.append(JobEvent(len(self.events) + 1, time.time(), kind, self.status, message, self.step))

    def set_status(self, status: JobStatus, runtime: Runtime, message: str = "") -> None:
        if status is self.status:
            return
        self.status = status
        self.event("status", message or status.value)
        runtime.observer.on_job_status(self.id, self.spec.adapter, status)
        self.save_progress(runtime, wait=True)

    def save_progress(self, runtime: Runtime, *, wait: bool = False) -> None:
        runtime.journal.save_progress(
            self.id,
            JobProgress(self.status, self.start_version or 0, self.step, self.last_loss, self.error, self.created_at),
            wait=wait,
        )

    def view(self, version: int) -> JobView:
        recent = list(itertools.islice(reversed(self.step_metrics), 20))  # the last 20, without copying them all
        busy = busy_s(recent)
        return JobView(
            self.id, self.spec.adapter, self.status, self.step, self.spec.max_steps, version, self.last_loss,
            self.error, self.created_at, len(recent) / busy if busy > 0 else None,
        )

    async def append_examples(self, runtime: Runtime, examples: Sequence) -> int:
        expected = type(self.spec.examples[0])
        if any(not isinstance(e, expected) for e in examples):
            raise InvalidJobSpec("examples", f"this job's objective takes {expected.__name__} rows")
        if hasattr(self.spec.objective, "options"):
            num_classes = len(self.spec.objective.options)
            if any(not 0 <= e.label < num_classes for e in examples):
                raise InvalidJobSpec("examples.label", f"labels must be in [0, {num_classes})")
        if isinstance(self.spec.objective, RewardObjective):
            for index, example in enumerate(examples):
                if not words(example.completion):
                    raise InvalidJobSpec(f"examples.{index}.completion", "the reference answer has no word to match")
        encoded = await asyncio.to_thread(
            self.spec.objective.encode, runtime.binding.tokenizer, examples, runtime.binding.config.max_model_len
        )
        self.spec = replace(self.spec, examples=tuple(self.spec.examples) + tuple(examples))
        if self.data is not None:
            self.data = self.data.extended(encoded)
        await asyncio.to_thread(runtime.journal.save_spec, self.id, self.spec)
        self.event("data", f"{len(examples)} examples appended; stream has {len(self.spec.examples)}")
        return len(self.spec.examples)


def method_hyper(spec: JobSpec):
    """The method's validated hyper-parameters from a job spec (InvalidJobSpec names the field)."""
    params = {
        "lr": spec.hyper.lr,
        "eps": spec.hyper.eps,
        "num_directions": spec.hyper.num_directions,
        "weight_decay": spec.hyper.weight_decay,
        **dict(spec.method_params),
    }
    try:
        return parse_hyper(spec.method, params)
    except InvalidHyperParameter as exc:
        raise InvalidJobSpec(_http_field(exc.field), str(exc)) from exc


# Where each method hyper-parameter lives in the HTTP job body.
_COMMON_FIELDS = {"lr": "hyperparameters.learning_rate", "eps": "hyperparameters.eps",
                  "num_directions": "hyperparameters.num_directions", "weight_decay": "hyperparameters.weight_decay",
                  "method": "method"}


def _http_field(field_name: str) -> str:
    return _COMMON_FIELDS.get(field_name, f"method_params.{field_name}")


def probe_slots_needed(spec: JobSpec) -> int:
    q = spec.hyper.num_directions
    return 2 * q + 1 if spec.method == "zo-sgd-cons" else 2 * q


def step_tokens(data: EncodedDataset | EncodedReward, batch_size: int, num_probes: int) -> int:
    """Engine tokens one step submits (the planner's unit of work), estimated from the first examples."""
    sample = data.sequences(range(min(len(data), 256)))
    per_example = work_tokens(data, sample) / max(1, min(len(data), 256))
    return max(1, round(per_example * batch_size * num_probes))


class StepTokens:
    """`step_tokens` for a job's steps, estimated again only when the job's data is a new object (appending to a
    stream builds a new one): building the sample's sequences on the service's event loop at every step cost
    more than the step's planning."""

    def __init__(self) -> None:
        self._data: EncodedDataset | EncodedReward | None = None
        self._shape: tuple[int, int] = (0, 0)
        self._tokens = 0

    def __call__(self, data: EncodedDataset | EncodedReward, batch_size: int, num_probes: int) -> int:
        if data is not self._data or (batch_size, num_probes) != self._shape:
            self._data, self._shape = data, (batch_size, num_probes)
            self._tokens = step_tokens(data, batch_size, num_probes)
        return self._tokens


async def _evaluate(runtime: Runtime, run: JobRun, adapter: LoadedAdapter, data: EncodedDataset) -> EvalMetric:
    tokens = step_tokens(data, len(data), 1)
    async with runtime.coscheduler.step(run.id, run.spec.weight, tokens, 1) as lease:
        return await _score_eval(runtime, run, adapter, data, lease.slot_ids[0], lease.gate)


async def _score_eval(
    runtime: Runtime, run: JobRun, adapter: LoadedAdapter, data: EncodedDataset, slot: int, gate: ChunkGate
) -> EvalMetric:
    binding = runtime.binding
    await binding.write_state(adapter.name, slot)
    salt = f"eval:{run.id}@{adapter.head}"
    total_loss, num_correct, count = 0.0, 0, 0
    for start in range(0, len(data), EVAL_CHUNK):
        indices = list(range(start, min(len(data), start + EVAL_CHUNK)))
        sequences = data.sequences(indices)
        # Through the token gate like a step's chunks: an eval is probe work in the engine too.
        (batch,) = await score_batches(binding, data, indices, sequences, [slot], [salt], PROBE_PRIORITY, gate)
        total_loss += batch.loss * batch.num_examples
        num_correct += batch.num_correct
        count += batch.num_examples
    classification = hasattr(data, "labels") or isinstance(data, EncodedReward)  # reward: the match rate
    metric = EvalMetric(run.step, adapter.head, total_loss / count, num_correct / count if classification else None, time.time())
    run.eval_metrics.append(metric)
    run.event("eval", f"eval loss {metric.loss:.4f}" + (f", accuracy {metric.accuracy:.4f}" if metric.accuracy is not None else ""))
    runtime.observer.on_eval(run.spec.adapter, metric)
    return metric


async def _train(runtime: Runtime, run: JobRun, adapter: LoadedAdapter, method, hyper, eval_data) -> None:
    """Step until `max_steps`, scoring each step while the one before it is committed.

    A step's update is sent to the worker as soon as it is scored, and the next step's probes go in right after
    it, so the engine has the job's next scoring work while the store commit and the publish run. A step counts
    as done (progress, metrics, journal) the moment its commit ends; the loop waits for it only before sending
    the next update. If the store's head moved on meanwhile (another writer committed, and the store head was
    reloaded), the step scored against the lost state is scored again from the reloaded one.
    """
    spec, host, binding = run.spec, runtime.host, runtime.binding
    num_probes = probe_slots_needed(spec)
    estimate = StepTokens()
    pending: PendingCommit | None = None
    step = run.step
    try:
        while step < spec.max_steps:
            await run.resume.wait()
            tokens = estimate(run.data, spec.batch_size, num_probes)
            paused = lambda: not run.resume.is_set()  # noqa: E731
            async with runtime.coscheduler.step(run.id, spec.weight, tokens, num_probes, paused) as lease:
                outcome = await run_engine_step(
                    binding, adapter.name, run.data, method, hyper.lr, job_seed=spec.seed, step=step,
                    batch_size=spec.batch_size, slots=lease.slot_ids, salt=f"probe:{run.id}:{next(_PROBE_SALTS)}",
                    gate=lease.gate, apply=False,
                )
            if pending is not None:
                done, pending = pending, None
                if not await _settle(runtime, run, adapter, done, eval_data):
                    step = run.step
                    continue
            pending = await host.start_commit(adapter, outcome, method, hyper)
            pending.task.add_done_callback(functools.partial(_record, runtime, run, adapter, pending))
            step += 1
            if not runtime.pipelined_commits:  # the commit ends before the next step's probes go in
                done, pending = pending, None
                await _settle(runtime, run, adapter, done, eval_data)
        if pending is not None:
            done, pending = pending, None
            await _settle(runtime, run, adapter, done, eval_data)
    finally:
        if pending is not None:  # cancelled or failed while the next step was scored: let the commit end
            with contextlib.suppress(Exception):
                await asyncio.shield(pending.task)


def _record(runtime: Runtime, run: JobRun, adapter: LoadedAdapter, pending: PendingCommit, task: asyncio.Task) -> None:
    """A step whose commit ended, in the job's progress, metrics and journal (called as the commit ends)."""
    if task.cancelled() or task.exception() is not None:
        return
    outcome = pending.outcome
    run.step = outcome.step + 1
    run.last_loss = outcome.loss
    metric = StepMetric(
        run.step, adapter.head, outcome.loss, outcome.projected_grad_norm,
        outcome.duration_s + time.perf_counter() - pending.sent_s,  # scored, applied, committed
        time.time(), outcome.num_sequences, outcome.num_tokens,
    )
    run.step_metrics.append(metric)
    runtime.observer.on_step(run.spec.adapter, metric)
    runtime.observer.on_commit(run.spec.adapter, adapter.head)
    if not task.result():
        run.event("head", f"version {adapter.head} was committed by someone else; training goes on from it")
    if run.step % 10 == 0:
        run.event("metrics", f"step {run.step}: loss {outcome.loss:.4f}")
    run.save_progress(runtime)


async def _settle(runtime: Runtime, run: JobRun, adapter: LoadedAdapter, pending: PendingCommit, eval_data) -> bool:
    """Wait for a step's commit and evaluate when due; False when the store's head had moved on."""
    committed = await pending.task  # its done callback `_record`, added before this wait, has run
    spec = run.spec
    if eval_data is not None and spec.eval_every and run.step % spec.eval_every == 0:
        await _evaluate(runtime, run, adapter, eval_data)
    return committed


async def run_job(runtime: Runtime, run: JobRun) -> None:
    spec, host, binding = run.spec, runtime.host, runtime.binding
    try:
        hyper = method_hyper(spec)
        max_len = binding.config.max_model_len
        run.data = await asyncio.to_thread(spec.objective.encode, binding.tokenizer, spec.examples, max_len)
        eval_data = (
            await asyncio.to_thread(spec.objective.encode, binding.tokenizer, spec.eval_examples, max_len)
            if spec.eval_examples
            else None
        )
        await host.create_if_missing(spec.adapter, spec.lora, spec.seed)
        layout = await host.layout_of(spec.adapter)
        artifacts, artifact_id = await job_artifacts(runtime, spec, layout)
        if artifact_id != spec.artifact_id:  # computed now: a restart reuses it
            run.spec = spec = replace(run.spec, artifact_id=artifact_id)
            await asyncio.to_thread(runtime.journal.save_spec, run.id, spec)
        method, method_wire = method_and_wire(spec, hyper, artifacts, layout, hyper_items(hyper))
        while True:  # stay queued until the adapter's serving buffers fit
            try:
                adapter = await host.load(spec.adapter, method_wire)
                break
            except NoCapacity:
                await runtime.slots.wait_change()
        if run.start_version is None:
            run.start_version = adapter.head
        run.step = max(0, adapter.head - run.start_version)
        run.started = True
        if run.resume_requested:
            run.set_status(JobStatus.RUNNING, runtime)
        await _train(runtime, run, adapter, method, hyper, eval_data)
        if eval_data is not None and not (spec.eval_every and run.step % spec.eval_every == 0):
            await _evaluate(runtime, run, adapter, eval_data)
        await host.snapshot_head(adapter)
        await host.publish_when_idle(adapter)
        run.set_status(JobStatus.SUCCEEDED, runtime)
    except asyncio.CancelledError:
        if not run.stopping_for_shutdown:
            run.set_status(JobStatus.CANCELLED, runtime)
    except Exception as exc:  # one job's failure must not stop the others
        log.exception("job %s failed", run.id)
        run.error = f"{type(exc).__name__}: {exc}"
        run.event("error", run.error)
        run.set_status(JobStatus.FAILED, runtime, run.error)
    finally:
        runtime.coscheduler.forget_job(run.id)
        await host.release_training(spec.adapter)
