"""The CPU priority of vLLM's processes next to the API process that serves users.

On a CPU machine the engine core (and, in the worker layout, the worker) computes without pause while ZO work
is queued, on the same cores as the API process, whose work is short and sits on every user's path: HTTP in,
tokenising, streaming tokens out. At equal priority the kernel lets a computing engine hold a core while the
API process waits, and the API process's event loop then lags behind the requests it has (the co-serving
benchmark, 2 cores, ZO jobs and users together: the loop's lags over 5 ms took a median 1.8 s a minute at
equal priority, 0.8 s with the engine at nice 10; results/coserve.md, session 11).
A higher nice value for the engine lets the API process take a core whenever it has work; the engine gets
everything the API process leaves.

Linux keeps a nice value per thread; threads inherit it from the thread that starts them, so renicing every
thread vLLM has started by the time the engine is up covers the ones it starts later.
"""

from __future__ import annotations

import logging
import os

import psutil

log = logging.getLogger(__name__)

ENGINE_PROCESS_MARKERS = ("VLLM", "EngineCore")  # vLLM titles its processes VLLM::EngineCore, VLLM::Worker...


def engine_processes(parent: psutil.Process | None = None) -> list[psutil.Process]:
    """vLLM's processes started (directly or not) by `parent` (default: this process)."""
    parent = parent or psutil.Process()
    return [p for p in parent.children(recursive=True) if any(m in _name(p) for m in ENGINE_PROCESS_MARKERS)]


def renice(processes: list[psutil.Process], nice: int) -> dict[int, int]:
    """Set every thread of `processes` to `nice`; returns pid -> number of threads set. Raising a nice value
    needs no privilege; lowering one below the current value does (then this raises PermissionError)."""
    placed = {}
    for process in processes:
        threads = process.threads()
        for thread in threads:
            os.setpriority(os.PRIO_PROCESS, thread.id, nice)
        placed[process.pid] = len(threads)
    return placed


def make_nicer(processes: list[psutil.Process], increment: int) -> dict[int, int]:
    """`renice` `processes` to this process's nice value + `increment` (at most 19). A failure is logged, not
    raised: the engine serves without the priority."""
    try:
        return renice(processes, min(19, os.getpriority(os.PRIO_PROCESS, 0) + increment))
    except (OSError, psutil.Error) as exc:
        log.warning("could not renice the engine's processes: %s", exc)
        return {}


def _name(process: psutil.Process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""
