"""Adapter request and response models."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from service.examples import ExampleIn


class AdapterOut(BaseModel):
    name: str
    object: Literal["zoserve.adapter"] = "zoserve.adapter"
    base_model: str
    rank: int
    alpha: float
    target_modules: list[str]
    head_version: int
    served_version: int | None
    active_job_id: str | None
    created_at: float


class AdapterList(BaseModel):
    object: Literal["list"] = "list"
    data: list[AdapterOut]


class VersionOut(BaseModel):
    version: int
    object: Literal["zoserve.adapter.version"] = "zoserve.adapter.version"
    parent: int | None
    step: int
    kind: str
    optimizer: str
    created_at: float
    has_snapshot: bool
    pinned: bool


class VersionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[VersionOut]
    offset: int
    limit: int
    has_more: bool


class RollbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    version: int = Field(ge=0)


class ExamplesIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    examples: list[ExampleIn] = Field(min_length=1, max_length=10_000)


class ExamplesAppended(BaseModel):
    object: Literal["zoserve.adapter.examples"] = "zoserve.adapter.examples"
    adapter: str
    num_appended: int
