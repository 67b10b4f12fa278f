"""The API process's garbage collector, set once the service is up.

Every user request, vLLM's output processing and the jobs' step loops share this process's one event loop;
a collection stops it. Two settings bound those stops:

- `freeze_gc_heap`: what vLLM's own server does after start-up. The engine client, torch and the app leave a
  large heap of static objects; frozen, no collection walks them again.
- `gc_full_collection_threshold`: Python's third threshold, how many generation-1 collections come before a
  full one (Python's own: 10). A full collection walks everything created since the freeze; in the
  co-serving benchmark with ZO jobs next to users the service ran 4-8 a minute, the longest 15-38 ms (the
  heap freeze leaves an old generation of thousands of objects, so Python's guard, wait until a quarter of
  it is new, holds back little). At 1000 (one every 10-15 minutes at that load) none ran in any run, and the
  longest collection took 5.4-8.6 ms (results/coserve.md, session 17). Cyclic garbage that reached the old
  generation waits that much longer to be freed.
"""

from __future__ import annotations

import gc

from service.settings import Settings


def settle_heap(settings: Settings) -> None:
    """Freeze what start-up left and set how often full collections run, per `settings`."""
    if settings.freeze_gc_heap:
        gc.collect()
        gc.freeze()
    if settings.gc_full_collection_threshold is not None:
        young, middle, _ = gc.get_threshold()
        gc.set_threshold(young, middle, settings.gc_full_collection_threshold)
