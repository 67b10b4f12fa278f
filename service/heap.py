"""The API process's garbage collector, set once the service is up.

Every user request, vLLM's output processing and the jobs' step loops share this process's one event loop;
a collection stops it. Two settings bound those stops:

- `freeze_gc_heap`: what vLLM's own server does after start-up. The engine client, torch and the app leave a
  large heap of static objects; frozen, no collection walks them again.
- `gc_full_collection_threshold`: Python's third threshold, how many generation-1 collections come before a
  full one (Python's own: 10). A full collection walks everything created since the freeze; in the
  co-serving benchmark with ZO jobs next to users the service ran 6 a minute, up to 38 ms each, and its
  event loop fell more than 5 ms behind for 3.4 s a minute. At 1000 (one full collection every ~15 minutes
  at that load), no full collection ran in a 4-minute run, the longest collection took 5.8 ms and the
  loop's lags came to 1.3 s a minute (results/coserve.md, session 17). Cyclic garbage that reached the old
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
