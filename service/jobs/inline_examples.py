"""A job body's inline examples, checked in slices so that a large dataset does not stop the event loop.

`JobCreate` documents `training_data` and `validation_data` as lists of example rows but leaves them
unchecked (`SkipValidation`): pydantic checks a whole body in one call, ~120 ms on the event loop for SST-2's
67k training rows, during which no user's token is streamed and no ZO step moves (a thread would not help:
the call holds the GIL throughout). Here the rows are checked `ROWS_PER_SLICE` at a time with a yield to the
loop in between (~4 ms a slice); the longest stop left is decoding the JSON itself (`bench/job_body_loop.py`:
29 against 117 ms). A bad row gets the same 422 FastAPI would have given, located at
`body.<field>.<index>...`.
"""

from __future__ import annotations

import asyncio

from fastapi.exceptions import RequestValidationError
from pydantic import TypeAdapter, ValidationError

from service.examples import ExampleIn
from service.jobs.schemas import JobCreate

ROWS_PER_SLICE = 2048
INLINE_FIELDS = ("training_data", "validation_data")
_ROWS: TypeAdapter[list[ExampleIn]] = TypeAdapter(list[ExampleIn])


async def with_checked_examples(body: JobCreate) -> JobCreate:
    """`body` with its inline example rows checked and turned into example models."""
    checked = {}
    for field in INLINE_FIELDS:
        rows = getattr(body, field)
        if rows is not None:
            checked[field] = await check_rows(rows, field)
    return body.model_copy(update=checked) if checked else body


async def check_rows(rows: object, field: str) -> list[ExampleIn]:
    if not isinstance(rows, list):
        raise _invalid("list_type", (field,), "Input should be a valid list", rows)
    if not rows:
        raise _invalid("too_short", (field,), "List should have at least 1 item after validation, not 0", rows)
    out: list[ExampleIn] = []
    for start in range(0, len(rows), ROWS_PER_SLICE):
        if start:
            await asyncio.sleep(0)
        try:
            out.extend(_ROWS.validate_python(rows[start : start + ROWS_PER_SLICE]))
        except ValidationError as exc:
            raise RequestValidationError([
                {**error, "loc": ("body", field, error["loc"][0] + start, *error["loc"][1:])} for error in exc.errors()
            ]) from None
    return out


def _invalid(kind: str, loc: tuple, message: str, value: object) -> RequestValidationError:
    return RequestValidationError([{"type": kind, "loc": ("body", *loc), "msg": message, "input": value}])
