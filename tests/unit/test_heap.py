"""service/heap.py: how often the API process runs full collections once the service is up.

Each case runs in a fresh interpreter: freezing and thresholds are process-wide and would leak into the
other tests.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

_CHILD = textwrap.dedent(
    """
    import gc, json, sys
    from service.heap import settle_heap
    from service.settings import Settings

    settle_heap(Settings(**json.loads(sys.argv[1])))
    full = []
    gc.callbacks.append(lambda phase, info: phase == "stop" and info["generation"] == 2 and full.append(1))
    kept = []
    for i in range(300_000):  # a service's churn: most objects die young, some live on
        record = {"i": i, "tags": [i]}
        if i % 3 == 0:
            kept.append(record)
    print(json.dumps({"threshold": gc.get_threshold(), "full": len(full), "frozen": gc.get_freeze_count() > 0}))
    """
)


def _run(settings: dict) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, json.dumps(settings)], capture_output=True, text=True, timeout=120, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("freeze", [True, False])
def test_full_collections_are_rare_at_the_default(freeze):
    default = _run({"freeze_gc_heap": freeze})
    assert default["threshold"][2] == 1000
    assert default["frozen"] is freeze
    assert default["full"] == 0
    pythons = _run({"freeze_gc_heap": freeze, "gc_full_collection_threshold": None})
    assert pythons["threshold"][2] == 10
    assert pythons["full"] >= 1  # the same allocations run full collections at Python's own threshold
