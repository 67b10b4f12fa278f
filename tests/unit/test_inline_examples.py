"""A job's inline example rows are checked in slices, with the event loop running between them."""

from __future__ import annotations

import asyncio

import pytest
from fastapi.exceptions import RequestValidationError

from service.examples import ClassificationExampleIn, CompletionExampleIn
from service.jobs.inline_examples import ROWS_PER_SLICE, check_rows, with_checked_examples
from service.jobs.schemas import JobCreate


async def test_rows_become_example_models_while_the_loop_keeps_running():
    rows = [{"text": "a film", "label": i % 2} for i in range(3 * ROWS_PER_SLICE)]
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0)

    task = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    before = ticks
    checked = await check_rows(rows, "training_data")
    ran_meanwhile = ticks - before
    task.cancel()
    assert [(r.text, r.label) for r in checked] == [(r["text"], r["label"]) for r in rows]
    assert all(isinstance(r, ClassificationExampleIn) for r in checked)
    assert ran_meanwhile >= 2  # at least once between each two of the three slices


async def test_a_bad_row_is_located_by_its_index_in_the_whole_list():
    rows = [{"text": "a film", "label": 0}] * (ROWS_PER_SLICE + 5) + [{"text": "", "label": 0}]
    with pytest.raises(RequestValidationError) as caught:
        await check_rows(rows, "training_data")
    locs = [error["loc"] for error in caught.value.errors()]
    assert locs and all(loc[:3] == ("body", "training_data", ROWS_PER_SLICE + 5) for loc in locs), locs


@pytest.mark.parametrize(("rows", "kind"), [([], "too_short"), ("rows", "list_type"), ({"text": "a"}, "list_type")])
async def test_an_empty_list_or_a_non_list_is_rejected(rows, kind):
    with pytest.raises(RequestValidationError) as caught:
        await check_rows(rows, "validation_data")
    (error,) = caught.value.errors()
    assert error["type"] == kind and error["loc"] == ("body", "validation_data")


async def test_a_body_gets_both_lists_checked_and_keeps_the_rest():
    body = JobCreate.model_validate({
        "adapter": "inline", "seed": 7,
        "training_data": [{"text": "a film", "label": 1}],
        "validation_data": [{"prompt": "a", "completion": "b"}],
    })
    assert body.training_data == [{"text": "a film", "label": 1}]  # unchecked until the route checks it
    checked = await with_checked_examples(body)
    assert isinstance(checked.training_data[0], ClassificationExampleIn)
    assert isinstance(checked.validation_data[0], CompletionExampleIn)
    assert checked.seed == 7 and checked.adapter == "inline"
