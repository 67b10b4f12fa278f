"""HTTP request and response models (pydantic), one pair per resource."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ClassificationExampleIn(_Strict):
    text: str = Field(min_length=1)
    label: int = Field(ge=0)


class ClassificationObjectiveIn(_Strict):
    type: Literal["classification"] = "classification"
    template: str = "{text} It was"
    options: list[str] = Field(default_factory=lambda: [" terrible", " great"], min_length=2)


class HyperparametersIn(_Strict):
    learning_rate: float = Field(1e-4, gt=0, le=10)
    eps: float = Field(1e-3, gt=0, le=1)
    num_directions: int = Field(1, ge=1, le=16)
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(16, ge=1, le=1024)
    max_steps: int = Field(100, ge=1, le=1_000_000)


class LoraIn(_Strict):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)


class JobCreate(_Strict):
    adapter: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
    method: Literal["mezo"] = "mezo"
    hyperparameters: HyperparametersIn = Field(default_factory=HyperparametersIn)
    lora: LoraIn = Field(default_factory=LoraIn)
    objective: ClassificationObjectiveIn = Field(default_factory=ClassificationObjectiveIn)
    training_data: list[ClassificationExampleIn] = Field(min_length=1, max_length=100_000)
    seed: int = Field(0, ge=0, le=2**62)


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


class CompletionRequest(BaseModel):
    model: str
    prompt: str
    max_tokens: int = Field(16, ge=1, le=4096)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: Literal[1] = 1
    stream: bool = False
    stop: str | list[str] | None = None
    seed: int | None = None
    user: str | None = None
