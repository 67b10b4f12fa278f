"""Per-phase summary of the engine's step trace (scheduler/engine/step_trace.py): what the forwards carried.

A user waits for the forward in flight when it arrives, so the length of the steps that carry probe tokens
next to decoding users is what ZO adds to time to first token; this splits each phase's steps into kinds and
gives each kind's share of the time, its period (start to the next step's start) and what it carried.

An `empty` step scheduled nothing: the engine had run out of work, and its period is mostly the wait for
the next request (in the ZO-alone phase: the jobs' turnaround between two scoring rounds). `gc_stalls` counts
the steps that spent over 2 ms in the engine process's garbage collector.
"""

from __future__ import annotations

import bisect
from pathlib import Path

from scheduler.engine.step_trace import StepRecord, read_step_trace
from scheduler.planning import percentile_ms

from coserve_parts.windows import Windows

KINDS = ("user_prefill", "decode_only", "decode_and_probes", "probes_only", "empty")
GC_STALL_S = 0.002  # a step with more than this in the collector counts as a GC stall


def step_kind(step: StepRecord) -> str:
    if step.num_user_prefills > 0:
        return "user_prefill"
    if step.user_tokens > 0:
        return "decode_and_probes" if step.probe_tokens > 0 else "decode_only"
    return "probes_only" if step.probe_tokens > 0 else "empty"


def steps_in_windows(steps: list[StepRecord], windows: Windows) -> list[tuple[StepRecord, float]]:
    """Steps that started inside the windows, each with its period up to the next step's start (cut at the end
    of its window: between two rounds' windows the engine waits for the next phase)."""
    inside = []
    for a, b in zip(steps, steps[1:]):
        end = windows.window_end(a.schedule_start_s)
        if end is not None:
            inside.append((a, min(b.schedule_start_s, end) - a.schedule_start_s))
    return inside


def summarise_steps(steps: list[StepRecord], windows: Windows) -> dict:
    """The windows' steps (`steps_in_windows`) by kind: shares of steps and time, periods, what they carried."""
    inside = steps_in_windows(steps, windows)
    total_s = sum(period for _, period in inside)
    result: dict = {"num_steps": len(inside), "steps_per_s": len(inside) / total_s if total_s else 0.0}
    for kind in KINDS:
        of_kind = [(s, p) for s, p in inside if step_kind(s) == kind]
        if not of_kind:
            continue
        periods_ms = [1000.0 * p for _, p in of_kind]
        result[kind] = {
            "share_of_steps": len(of_kind) / len(inside),
            "share_of_time": sum(p for _, p in of_kind) / total_s,
            "period_p50_ms": percentile_ms(periods_ms, 0.5),
            "period_p90_ms": percentile_ms(periods_ms, 0.9),
            "period_p99_ms": percentile_ms(periods_ms, 0.99),
            "forward_p50_ms": percentile_ms([1000.0 * s.forward_s for s, _ in of_kind], 0.5),
            "probe_tokens_mean": sum(s.probe_tokens for s, _ in of_kind) / len(of_kind),
            "num_probes_mean": sum(s.num_probes for s, _ in of_kind) / len(of_kind),
            "user_tokens_mean": sum(s.user_tokens for s, _ in of_kind) / len(of_kind),
        }
    result["main_thread"] = main_thread_time([s for s, _ in inside])
    result["gc_stalls"] = gc_stalls([s for s, _ in inside])
    return result


def probe_idle(steps: list[StepRecord], windows: Windows, job_steps: dict[str, list[tuple[float, float]]]) -> dict:
    """Engine time with no probe work: steps that carried no probe token while no probe waited in the engine's
    queue, as shares of the windows' step time. Split by where the jobs were as each such step started:
    `a_job_between_steps` (some job was outside its steps: waiting for its grant, e.g. held by fair sharing,
    or between the end of one step and the start of the next) or `every_job_mid_step` (each job inside a step:
    its update, commit, probe write or first chunks had not reached the engine yet). `spells`: runs of such
    steps back to back, with their lengths. `job_steps`: each job's steps as (start, end) wall-clock times."""
    inside = steps_in_windows(steps, windows)
    total_s = sum(period for _, period in inside)
    spans = {job: sorted(intervals) for job, intervals in job_steps.items()}
    starts = {job: [start for start, _ in intervals] for job, intervals in spans.items()}

    def mid_step(job: str, t: float) -> bool:
        i = bisect.bisect_right(starts[job], t) - 1
        return i >= 0 and t < spans[job][i][1]

    shares = {"every_job_mid_step": 0.0, "a_job_between_steps": 0.0}
    spells_ms, spell_s, last_end = [], 0.0, None
    for step, period in inside:
        if step.probe_tokens > 0 or step.num_waiting > step.num_user_waiting:
            continue
        t = step.schedule_start_s
        key = "every_job_mid_step" if spans and all(mid_step(job, t) for job in spans) else "a_job_between_steps"
        shares[key] += period
        if last_end is not None and abs(t - last_end) < 1e-9:
            spell_s += period
        else:
            if spell_s:
                spells_ms.append(1000.0 * spell_s)
            spell_s = period
        last_end = t + period
    if spell_s:
        spells_ms.append(1000.0 * spell_s)
    idle_s = sum(shares.values())
    return {
        "share_of_time": idle_s / total_s if total_s else 0.0,
        **{key: value / total_s if total_s else 0.0 for key, value in shares.items()},
        "spells": {
            "num": len(spells_ms),
            "p50_ms": percentile_ms(spells_ms, 0.5) if spells_ms else None,
            "p90_ms": percentile_ms(spells_ms, 0.9) if spells_ms else None,
        },
    }


def gc_stalls(steps: list[StepRecord]) -> dict | None:
    """Steps that spent over `GC_STALL_S` in the collector: how many, and their seconds in it (None for a trace
    without the GC column)."""
    if not any(s.gc_s is not None for s in steps):
        return None
    stalls = [s.gc_s for s in steps if s.gc_s is not None and s.gc_s > GC_STALL_S]
    return {"num_steps": len(stalls), "gc_s": sum(stalls)}


def main_thread_time(steps: list[StepRecord]) -> dict | None:
    """Where the engine core's scheduling thread spent its steps (schedule, forward, update), over all the
    steps and over the slowest 1 % of them by span: computing (its own CPU), waiting for a core other
    processes held, blocked (on the GIL, a lock or I/O: the rest), and of the computing, in the collector.
    Shares of the steps' summed span; None for a trace without the CPU columns."""
    steps = [s for s in steps if s.thread_cpu_s is not None]
    if not steps:
        return None

    def shares(of: list[StepRecord]) -> dict:
        span = sum(s.update_end_s - s.schedule_start_s for s in of)
        cpu = sum(s.thread_cpu_s for s in of)
        wait = sum(s.runqueue_wait_s or 0.0 for s in of)
        return {
            "span_mean_ms": 1000.0 * span / len(of),
            "cpu": cpu / span if span else 0.0,
            "runqueue_wait": wait / span if span else 0.0,
            "blocked": max(0.0, span - cpu - wait) / span if span else 0.0,
            "gc": sum(s.gc_s or 0.0 for s in of) / span if span else 0.0,
        }

    slowest = sorted(steps, key=lambda s: s.update_end_s - s.schedule_start_s)[-max(1, len(steps) // 100):]
    return {"all_steps": shares(steps), "slowest_1pct": shares(slowest)}


def load_steps(prefix: str) -> list[StepRecord]:
    """Every trace file the run's engine core wrote under `prefix`, oldest step first."""
    base = Path(prefix)
    steps = [step for path in sorted(base.parent.glob(f"{base.name}.*.tsv")) for step in read_step_trace(path)]
    return sorted(steps, key=lambda s: s.schedule_start_s)
