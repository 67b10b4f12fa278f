"""Training examples at the HTTP boundary: the two row shapes, JSONL parsing, conversion to runtime records.

Rows are `{"text", "label"}` (classification) or `{"prompt", "completion"}` (completion). One dataset holds
one shape; which one a job needs follows from its objective.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from scheduler.objectives import LabelledText, PromptCompletion
from service.errors import InvalidInput

ExampleKind = Literal["classification", "completion"]


class ClassificationExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    text: str = Field(min_length=1)
    label: int = Field(ge=0)


class CompletionExampleIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompt: str
    completion: str = Field(min_length=1)


ExampleIn = ClassificationExampleIn | CompletionExampleIn


def kind_of(example: ExampleIn) -> ExampleKind:
    return "classification" if isinstance(example, ClassificationExampleIn) else "completion"


def to_records(
    examples: Sequence[ExampleIn], kind: ExampleKind, field: str
) -> tuple[LabelledText, ...] | tuple[PromptCompletion, ...]:
    """Runtime records; every row must have the shape `kind` (a 422 naming `field[i]` otherwise)."""
    for index, example in enumerate(examples):
        if kind_of(example) != kind:
            wanted = '{"text", "label"}' if kind == "classification" else '{"prompt", "completion"}'
            raise InvalidInput(f"{field}[{index}]: a {kind} objective needs rows {wanted}", f"{field}.{index}")
    if kind == "classification":
        return tuple(LabelledText(e.text, e.label) for e in examples)  # type: ignore[union-attr]
    return tuple(PromptCompletion(e.prompt, e.completion) for e in examples)  # type: ignore[union-attr]


def parse_jsonl(data: bytes, field: str = "file") -> list[ExampleIn]:
    """Every non-blank line a JSON object of one row shape; errors name the 1-based line."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidInput(f"{field}: not UTF-8 ({exc.reason} at byte {exc.start})", field) from None
    rows: list[ExampleIn] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{field}: line {number} is not JSON ({exc.msg})", field) from None
        rows.append(_row(obj, field, number))
    if not rows:
        raise InvalidInput(f"{field}: no examples", field)
    kinds = {kind_of(r) for r in rows}
    if len(kinds) > 1:
        raise InvalidInput(f"{field}: rows mix {{text, label}} and {{prompt, completion}}", field)
    return rows


def _row(obj: object, field: str, number: int) -> ExampleIn:
    if not isinstance(obj, dict):
        raise InvalidInput(f"{field}: line {number} is not a JSON object", field)
    model = ClassificationExampleIn if "text" in obj or "label" in obj else CompletionExampleIn
    try:
        return model.model_validate(obj)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"])
        raise InvalidInput(f"{field}: line {number}: {where}: {first['msg']}", field) from None
