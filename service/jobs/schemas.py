"""Job request and response models."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SkipValidation

from service.examples import ExampleIn

ADAPTER_NAME = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
FILE_ID = r"^file-[0-9a-f]{24}$"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassificationObjectiveIn(_Strict):
    type: Literal["classification"] = "classification"
    template: str = Field("{text} It was", description="must contain {text}")
    options: list[str] = Field(default_factory=lambda: [" terrible", " great"], min_length=2, max_length=64)


class CompletionObjectiveIn(_Strict):
    type: Literal["completion"]


class RewardObjectiveIn(_Strict):
    """Greedy-generate after each prompt; reward 1 when the generation matches the row's completion."""

    type: Literal["reward"]
    template: str = Field("{prompt}", description="must contain {prompt}")
    match: Literal["exact", "contains"] = Field("contains", description="exact words, or the answer's words in a run")
    max_new_tokens: int = Field(8, ge=1, le=256)
    stop: list[str] = Field(default_factory=list, max_length=8, description="stop strings, e.g. [\"\\n\"]")


ObjectiveIn = Annotated[
    ClassificationObjectiveIn | CompletionObjectiveIn | RewardObjectiveIn, Field(discriminator="type")
]


class SparseMaskIn(_Strict):
    """Keep the most sensitive `fraction` of adapter coordinates (squared LM-loss gradients on the job's text)."""

    fraction: float = Field(gt=0, le=1)
    num_batches: int = Field(4, ge=1, le=64)
    batch_size: int = Field(8, ge=1, le=64)


class DirectionIn(_Strict):
    """Shape the Gaussian directions (mezo-sgd and the zo-* methods): per-block scales and/or a sparse mask."""

    block_scales: dict[str, float] | None = Field(None, description="{PEFT tensor name: scale >= 0}, every tensor")
    block_scales_file: str | None = Field(None, pattern=FILE_ID, description="an upload with purpose block-scales")
    sparse_mask: SparseMaskIn | None = None


class HyperparametersIn(_Strict):
    learning_rate: float = Field(1e-4, gt=0, le=10)
    eps: float = Field(1e-3, gt=0, le=1)
    num_directions: int = Field(1, ge=1, le=16, description="q: probe directions per step")
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1, le=1024)
    max_steps: int = Field(100, ge=1, le=1_000_000)


class LoraIn(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class JobCreate(_Strict):
    """Train adapter `adapter` (created when new, else continued from its head)."""

    adapter: str = Field(pattern=ADAPTER_NAME)
    method: str = Field("mezo-sgd", description="a ZO method name (scheduler.zo.methods.REGISTRY)")
    method_params: dict[str, float] = Field(default_factory=dict, description="method-specific hyper-parameters")
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    lora: LoraIn = Field(default_factory=LoraIn)
    objective: ObjectiveIn = Field(default_factory=ClassificationObjectiveIn)
    # Exactly one of training_data (inline) and training_file (an id from POST /v1/files).
    # Inline rows are documented here but checked by the route, in slices (service/jobs/inline_examples.py):
    # pydantic checks a body in one call on the event loop, ~120 ms for SST-2's 67k rows (bench/job_body_loop.py).
    training_data: SkipValidation[list[ExampleIn] | None] = Field(None, min_length=1)
    training_file: str | None = Field(None, pattern=FILE_ID)
    validation_data: SkipValidation[list[ExampleIn] | None] = Field(None, min_length=1)
    validation_file: str | None = Field(None, pattern=FILE_ID)
    eval_every: int = Field(0, ge=0, description="steps between evaluations (0: only at the end)")
    seed: int = Field(0, ge=0, le=2**62)
    weight: float = Field(1.0, gt=0, le=1000, description="fair-share weight against other jobs")
    direction: DirectionIn | None = None


class JobOut(BaseModel):
    id: str
    object: Literal["zoserve.job"] = "zoserve.job"
    adapter: str
    status: str
    step: int
    max_steps: int
    version: int
    last_loss: float | None
    error: str | None
    created_at: float
    steps_per_s: float | None


class JobList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobOut]
    offset: int
    limit: int
    has_more: bool


class JobEventOut(BaseModel):
    seq: int
    time: float
    kind: str
    status: str
    message: str
    step: int


class JobEventList(BaseModel):
    object: Literal["list"] = "list"
    data: list[JobEventOut]


class StepMetricOut(BaseModel):
    step: int
    version: int
    loss: float
    projected_grad_norm: float
    duration_s: float
    steps_per_s: float | None
    time: float
    num_sequences: int
    num_tokens: int


class EvalMetricOut(BaseModel):
    step: int
    version: int
    loss: float
    accuracy: float | None
    time: float


class JobMetrics(BaseModel):
    object: Literal["zoserve.job.metrics"] = "zoserve.job.metrics"
    job_id: str
    steps: list[StepMetricOut]
    evals: list[EvalMetricOut]
    steps_per_s: float | None
    has_more: bool = Field(description="more steps follow: ask again with after_step = the last step here")
