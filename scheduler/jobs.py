"""Job records: what a user asked for (spec), where it stands (status), and a read-only view of it."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from scheduler.objectives import ClassificationObjective, CompletionObjective, LabelledText, PromptCompletion
from scheduler.zo.lora_layout import LoraShape
from scheduler.zo.mezo import MezoHyper


class JobStatus(enum.StrEnum):
    VALIDATING = "validating"
    QUEUED = "queued"
    RUNNING = "running"
    PAUSED = "paused"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_final(self) -> bool:
        return self in (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELLED)


@dataclass(frozen=True)
class JobSpec:
    adapter: str
    examples: tuple[LabelledText, ...] | tuple[PromptCompletion, ...]
    objective: ClassificationObjective | CompletionObjective
    hyper: MezoHyper = field(default_factory=MezoHyper)
    lora: LoraShape = LoraShape(8, 16.0, ("q_proj", "v_proj"))
    batch_size: int = 16
    max_steps: int = 100
    seed: int = 0
    weight: float = 1.0


@dataclass(frozen=True)
class JobView:
    id: str
    adapter: str
    status: JobStatus
    step: int
    max_steps: int
    version: int
    last_loss: float | None
    error: str | None
    created_at: float
    steps_per_s: float | None
