"""The runtime: job lifecycle, slot assignment and the step loop over one engine binding.

Each running job is one asyncio task that runs MeZO steps back to back; the engine batches the probe
sequences of all running jobs together (and next to user requests, which carry a better priority).
After each step the adapter's new version is published to its serving double buffer.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from scheduler.engine.binding import EngineBinding
from scheduler.errors import AdapterBusy, InvalidJobSpec, JobNotFound, NoCapacity
from scheduler.jobs import JobSpec, JobStatus, JobView
from scheduler.objectives import ClassificationObjective, EncodedDataset
from scheduler.serving import ServingLease, ServingTable
from scheduler.zo.lora_layout import LoraLayout, initial_state, layout_for_model_dir
from scheduler.zo_step import ProbeSlots, StepOutcome, run_mezo_step

log = logging.getLogger(__name__)


class SlotPool:
    def __init__(self, slot_ids: tuple[int, ...]):
        self._free = list(slot_ids)
        self.num_slots = len(slot_ids)
        self._released = asyncio.Event()

    @property
    def num_free(self) -> int:
        return len(self._free)

    def take(self, count: int) -> tuple[int, ...] | None:
        if count > len(self._free):
            return None
        taken, self._free = tuple(self._free[:count]), self._free[count:]
        return taken

    def give_back(self, slots: tuple[int, ...]) -> None:
        self._free.extend(slots)
        self._released.set()

    async def wait_release(self) -> None:
        self._released.clear()
        await self._released.wait()


@dataclass
class _Adapter:
    name: str
    layout: LoraLayout
    version: int = 0


@dataclass
class _Job:
    id: str
    spec: JobSpec
    data: EncodedDataset | None = None
    status: JobStatus = JobStatus.VALIDATING
    step: int = 0
    last_loss: float | None = None
    error: str | None = None
    created_at: float = field(default_factory=time.time)
    history: list[StepOutcome] = field(default_factory=list)
    resume: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task | None = None

    def view(self, version: int) -> JobView:
        recent = self.history[-20:]
        busy_s = sum(o.duration_s for o in recent)
        return JobView(
            self.id,
            self.spec.adapter,
            self.status,
            self.step,
            self.spec.max_steps,
            version,
            self.last_loss,
            self.error,
            self.created_at,
            len(recent) / busy_s if busy_s > 0 else None,
        )


class Runtime:
    def __init__(self, binding: EngineBinding):
        self.binding = binding
        self.serving = ServingTable()
        self.slots = SlotPool(binding.slot_ids)
        self._adapters: dict[str, _Adapter] = {}
        self._jobs: dict[str, _Job] = {}

    # ----------------------------------------------------------------- queries
    def job(self, job_id: str) -> JobView:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job.view(self._adapter_version(job.spec.adapter))

    def jobs(self) -> list[JobView]:
        return [j.view(self._adapter_version(j.spec.adapter)) for j in self._jobs.values()]

    def job_history(self, job_id: str) -> list[StepOutcome]:
        if job_id not in self._jobs:
            raise JobNotFound(job_id)
        return list(self._jobs[job_id].history)

    def served_adapters(self) -> list[str]:
        return self.serving.adapters()

    def _adapter_version(self, name: str) -> int:
        adapter = self._adapters.get(name)
        return adapter.version if adapter else 0

    # ----------------------------------------------------------------- jobs
    def _validate(self, spec: JobSpec) -> None:
        config = self.binding.config
        if spec.lora.rank > config.max_lora_rank:
            raise InvalidJobSpec("lora.rank", f"must be <= the engine's max_lora_rank {config.max_lora_rank}")
        unknown = set(spec.lora.target_modules) - set(config.target_modules)
        if unknown:
            raise InvalidJobSpec("lora.target_modules", f"{sorted(unknown)} not enabled in the engine {list(config.target_modules)}")
        needed = 2 * spec.hyper.num_directions + (0 if spec.adapter in self._adapters else 2)
        if needed > self.slots.num_slots:
            raise InvalidJobSpec("hyper.num_directions", f"needs {needed} LoRA slots, the engine has {self.slots.num_slots}")
        if not spec.examples:
            raise InvalidJobSpec("training_data", "no examples")
        adapter = self._adapters.get(spec.adapter)
        if adapter is not None and adapter.layout.shape != spec.lora:
            raise InvalidJobSpec("lora", f"adapter {spec.adapter!r} exists with shape {adapter.layout.shape}")
        if any(j.spec.adapter == spec.adapter and not j.status.is_final for j in self._jobs.values()):
            raise AdapterBusy(f"adapter {spec.adapter!r} already has an active job")

    async def create_job(self, spec: JobSpec) -> JobView:
        self._validate(spec)
        if isinstance(spec.objective, ClassificationObjective):
            num_classes = len(spec.objective.options)
            if any(not 0 <= ex.label < num_classes for ex in spec.examples):
                raise InvalidJobSpec("training_data.label", f"labels must be in [0, {num_classes})")
        job = _Job(f"job-{uuid.uuid4().hex[:12]}", spec)
        self._jobs[job.id] = job
        job.data = await asyncio.to_thread(
            spec.objective.encode, self.binding.tokenizer, spec.examples, self.binding.config.max_model_len
        )
        job.status = JobStatus.QUEUED
        job.resume.set()
        job.task = asyncio.create_task(self._run_job(job), name=f"zo-job-{job.id}")
        return self.job(job.id)

    def pause(self, job_id: str) -> JobView:
        job = self._get(job_id)
        if job.status in (JobStatus.RUNNING, JobStatus.QUEUED):
            job.resume.clear()
            job.status = JobStatus.PAUSED
        return self.job(job_id)

    def resume(self, job_id: str) -> JobView:
        job = self._get(job_id)
        if job.status is JobStatus.PAUSED:
            job.status = JobStatus.RUNNING
            job.resume.set()
        return self.job(job_id)

    async def cancel(self, job_id: str) -> JobView:
        job = self._get(job_id)
        if not job.status.is_final and job.task is not None:
            job.task.cancel()
            await asyncio.gather(job.task, return_exceptions=True)
        return self.job(job_id)

    def _get(self, job_id: str) -> _Job:
        job = self._jobs.get(job_id)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def _ensure_adapter(self, spec: JobSpec) -> _Adapter:
        adapter = self._adapters.get(spec.adapter)
        if adapter is not None:
            return adapter
        buffers = self.slots.take(2)
        if buffers is None:
            raise NoCapacity("no free LoRA slots for the adapter's serving buffers")
        layout = await asyncio.to_thread(layout_for_model_dir, self.binding.config.model, spec.lora)
        await self.binding.set_state(spec.adapter, layout, initial_state(layout, spec.seed))
        adapter = _Adapter(spec.adapter, layout)
        self._adapters[spec.adapter] = adapter
        self.serving.register(spec.adapter, buffers)
        await self._publish(adapter)
        return adapter

    async def _publish(self, adapter: _Adapter) -> bool:
        slot = self.serving.publish_target(adapter.name)
        if slot is None:
            return False
        await self.binding.write_state(adapter.name, slot)
        self.serving.mark_published(adapter.name, slot, adapter.version)
        return True

    async def _run_job(self, job: _Job) -> None:
        spec = job.spec
        probe_slots: tuple[int, ...] | None = None
        try:
            adapter = await self._ensure_adapter(spec)
            q = spec.hyper.num_directions
            while (probe_slots := self.slots.take(2 * q)) is None:
                await self.slots.wait_release()
            slots = ProbeSlots(probe_slots[:q], probe_slots[q:])
            while job.step < spec.max_steps:
                await job.resume.wait()
                job.status = JobStatus.RUNNING
                outcome = await run_mezo_step(
                    self.binding,
                    adapter.name,
                    job.data,
                    spec.hyper,
                    job_seed=spec.seed,
                    step=job.step,
                    batch_size=spec.batch_size,
                    slots=slots,
                    salt=f"probe:{adapter.name}@{adapter.version}",
                )
                adapter.version += 1
                job.step += 1
                job.last_loss = outcome.loss
                job.history.append(outcome)
                await self._publish(adapter)
            await self._publish_when_idle(adapter)
            job.status = JobStatus.SUCCEEDED
        except asyncio.CancelledError:
            job.status = JobStatus.CANCELLED
        except Exception as exc:  # the step loop of other jobs must survive one job's failure
            log.exception("job %s failed", job.id)
            job.status = JobStatus.FAILED
            job.error = f"{type(exc).__name__}: {exc}"
        finally:
            if probe_slots is not None:
                self.slots.give_back(probe_slots)

    async def _publish_when_idle(self, adapter: _Adapter, timeout_s: float = 30.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.serving.live_version(adapter.name) != adapter.version and time.monotonic() < deadline:
            if not await self._publish(adapter):
                await asyncio.sleep(0.01)

    # ----------------------------------------------------------------- serving
    @asynccontextmanager
    async def lease(self, adapter: str) -> AsyncIterator[ServingLease]:
        lease = self.serving.acquire(adapter)
        try:
            yield lease
        finally:
            self.serving.release(lease)

    async def shutdown(self) -> None:
        for job in self._jobs.values():
            if job.task is not None and not job.task.done():
                job.task.cancel()
        await asyncio.gather(*(j.task for j in self._jobs.values() if j.task is not None), return_exceptions=True)
