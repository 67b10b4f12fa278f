"""Job records: what a user asked for (spec), where it stands (status), and a read-only view of it."""

from __future__ import annotations

import bisect
import enum
import itertools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from scheduler.objectives import ClassificationObjective, CompletionObjective, LabelledText, PromptCompletion
from scheduler.rewards import RewardObjective
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
class SparseMaskRequest:
    """A SensZOQ-style mask computed once at job start: squared LM-loss gradients on the job's own text."""

    fraction: float  # of adapter coordinates kept, (0, 1]
    num_batches: int = 4
    batch_size: int = 8


@dataclass(frozen=True)
class JobSpec:
    adapter: str
    examples: tuple[LabelledText, ...] | tuple[PromptCompletion, ...]
    objective: ClassificationObjective | CompletionObjective | RewardObjective
    hyper: MezoHyper = field(default_factory=MezoHyper)  # lr, eps, q, weight decay (all methods)
    lora: LoraShape = LoraShape(8, 16.0, ("q_proj", "v_proj"))
    batch_size: int = 16
    max_steps: int = 100
    seed: int = 0
    weight: float = 1.0  # fair-share weight against other jobs
    method: str = "mezo-sgd"  # a name in scheduler.zo.methods.REGISTRY
    method_params: tuple[tuple[str, float], ...] = ()  # method-specific hyper-parameters (momentum, ν, rank…)
    eval_examples: tuple[LabelledText, ...] | tuple[PromptCompletion, ...] = ()
    eval_every: int = 0  # steps between evaluations on eval_examples (0: only at the end, if any)
    block_scales: tuple[tuple[str, float], ...] = ()  # raw per-tensor perturbation scales (normalised at start)
    sparse_mask: SparseMaskRequest | None = None
    artifact_id: str | None = None  # the store id of the job's direction artifacts, once computed


@dataclass(frozen=True)
class JobEvent:
    seq: int  # 1, 2, … per job
    time: float
    kind: str  # "status" | "metrics" | "eval" | "error"
    status: JobStatus
    message: str
    step: int


@dataclass(frozen=True)
class StepMetric:
    step: int  # steps done (= the version the step produced, for a job that started at version 0)
    version: int
    loss: float
    projected_grad_norm: float
    duration_s: float  # scored, applied and committed (the commit overlaps the next step's scoring)
    time: float
    num_sequences: int
    num_tokens: int


def busy_s(metrics: Iterable[StepMetric]) -> float:
    """Wall time the steps' spans [end − duration, end] cover: overlapping steps (a commit runs while the next step
    is scored) count once, and time between steps (paused, waiting for a turn) not at all."""
    total, covered_to = 0.0, -math.inf
    for start, end in sorted((m.time - m.duration_s, m.time) for m in metrics):
        if end > covered_to:
            total += end - max(start, covered_to)
            covered_to = end
    return total


@dataclass(frozen=True)
class EvalMetric:
    step: int
    version: int
    loss: float
    accuracy: float | None
    time: float


@dataclass(frozen=True)
class MetricsPage:
    """A page of a job's metrics: steps after a step number, in order, and the evaluations among them."""

    steps: list[StepMetric]
    evals: list[EvalMetric]
    has_more: bool  # steps past this page exist; ask again after the last step here


def metrics_page(
    steps: Sequence[StepMetric], evals: Iterable[EvalMetric], after_step: int, limit: int
) -> MetricsPage:
    """At most `limit` of `steps` (in step order, as a job records them) with a step number above `after_step`,
    and the evaluations with a step number in the same range. Costs a binary search and the page itself, not a
    pass over every recorded step: a long job keeps up to 100,000."""
    start = bisect.bisect_right(steps, after_step, key=lambda m: m.step)
    page = list(itertools.islice(steps, start, start + limit))
    has_more = start + len(page) < len(steps)
    up_to = page[-1].step if has_more else math.inf
    return MetricsPage(page, [e for e in evals if after_step < e.step <= up_to], has_more)


@dataclass(frozen=True)
class AdapterView:
    name: str
    base_model: str
    rank: int
    alpha: float
    target_modules: tuple[str, ...]
    head_version: int
    served_version: int | None
    active_job_id: str | None
    created_at: float


@dataclass(frozen=True)
class VersionView:
    version: int
    parent: int | None
    step: int
    kind: str  # "initial" | "update" | "rollback"
    optimizer: str
    created_at: float
    has_snapshot: bool
    pinned: bool


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
