"""Summaries of a run: user latency, ZO step rates and token shares per phase, the figures and the JSON result."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from coserve_parts.monitors import steal_peak_cores
from coserve_parts.steps import probe_idle, summarise_steps
from coserve_parts.windows import Windows

if TYPE_CHECKING:
    from coserve_parts.load import UserSample
    from coserve_parts.measure import Raw

TARGETS = {"user_ttft_p99_ratio": ("<=", 1.25), "zo_steps_ratio": (">=", 0.5), "fair_share_error": ("<=", 0.10)}
PAPER_TTFT_P99_INCREASE = "+215% to +695%"  # the seed paper's serving variant, throughput kept
SENT_LATE_S = 0.020  # a request the load generator sent more than this after its scheduled arrival
QUIET_STEAL_CORES = 0.05  # a round is quiet when none of its three windows lost more to the hypervisor


def _pct(values_s, q: float) -> float | None:
    values = [v for v in values_s if v is not None]
    return float(np.percentile(values, q) * 1000.0) if values else None


def user_summary(samples: list[UserSample], duration_s: float) -> dict:
    ok = [s for s in samples if s.error is None and s.ttft_s is not None]
    return {
        "num_requests": len(samples),
        "num_errors": sum(1 for s in samples if s.error),
        # Sampled end-of-text first (one output token, no text): no TTFT to count, not a service error.
        "num_without_text": sum(1 for s in samples if not s.error and s.ttft_s is None),
        "errors": sorted({s.error for s in samples if s.error})[:5],
        "offered_rate_per_s": len(samples) / duration_s,
        "ttft_p50_ms": _pct([s.ttft_s for s in ok], 50),
        "ttft_p90_ms": _pct([s.ttft_s for s in ok], 90),
        "ttft_p99_ms": _pct([s.ttft_s for s in ok], 99),
        "e2e_p50_ms": _pct([s.e2e_s for s in ok], 50),
        "e2e_p99_ms": _pct([s.e2e_s for s in ok], 99),
        "send_lag_p99_ms": _pct([s.send_lag_s for s in samples], 99),
        # Diagnostic only (the targets use every request): the load generator is a separate process, so a
        # request it sent late was held up by the machine, not (only) by the server.
        "num_sent_late": sum(1 for s in samples if s.send_lag_s > SENT_LATE_S),
        "ttft_p99_ms_sent_on_time": _pct([s.ttft_s for s in ok if s.send_lag_s <= SENT_LATE_S], 99),
        "mean_output_tokens": float(np.mean([s.num_output_tokens for s in ok])) if ok else None,
    }


def zo_summary(steps_by_job: dict[str, tuple[float, list[dict]]], windows: Windows) -> dict:
    """Steps that completed inside the windows, per second of window."""
    duration = windows.duration_s
    jobs = {}
    for adapter, (weight, steps) in steps_by_job.items():
        inside = [m for m in steps if m["time"] in windows]
        jobs[adapter] = {
            "weight": weight,
            "num_steps": len(inside),
            "steps_per_s": len(inside) / duration,
            "num_tokens": sum(m["num_tokens"] for m in inside),
            "step_s_median": float(np.median([m["duration_s"] for m in inside])) if inside else None,
        }
    total_tokens = sum(j["num_tokens"] for j in jobs.values())
    total_weight = sum(j["weight"] for j in jobs.values())
    for j in jobs.values():
        j["token_share"] = j["num_tokens"] / total_tokens if total_tokens else None
        j["fair_share"] = j["weight"] / total_weight
    heavy = max(jobs.values(), key=lambda j: j["weight"])
    return {
        "duration_s": duration,
        "steps_per_s": sum(j["steps_per_s"] for j in jobs.values()),
        "num_tokens": total_tokens,
        "tokens_per_s": total_tokens / duration,
        "fair_share_error": abs(heavy["token_share"] - heavy["fair_share"]) if total_tokens else None,
        "jobs": jobs,
    }


def _ttft_p99_ms(samples: list[UserSample], phase: str, windows: Windows) -> float | None:
    return _pct([s.ttft_s for s in samples if s.phase == phase and s.error is None and s.scheduled_s in windows], 99)


def _ttft_p99_ratio(
    samples: list[UserSample], users: Windows, together: Windows, phase: str = "together"
) -> float | None:
    return _ratio(_ttft_p99_ms(samples, phase, together), _ttft_p99_ms(samples, "users", users))


def _zo_steps_ratio(steps_by_job: dict[str, tuple[float, list[dict]]], zo: Windows, together: Windows) -> float | None:
    return _ratio(zo_summary(steps_by_job, together)["steps_per_s"], zo_summary(steps_by_job, zo)["steps_per_s"])


def ttft_p99_ratio_by_round(
    samples: list[UserSample], users: Windows, together: Windows, phase: str = "together"
) -> list[float | None]:
    """Round k's together p99 TTFT / its users-alone p99: a ratio of two windows minutes apart at most, so a
    slow stretch of the machine that lands in one window moves one round's ratio, not every round's."""
    return [_ttft_p99_ratio(samples, Windows.of(*a), Windows.of(*b), phase) for a, b in zip(users, together)]


def zo_steps_ratio_by_round(
    steps_by_job: dict[str, tuple[float, list[dict]]], zo: Windows, together: Windows
) -> list[float | None]:
    """Round k's ZO steps/s together / its ZO-alone steps/s, the windows of one round paired as in
    `ttft_p99_ratio_by_round`."""
    return [_zo_steps_ratio(steps_by_job, Windows.of(*a), Windows.of(*b)) for a, b in zip(zo, together)]


def quiet_rounds(cpu_by_window: dict[str, list[dict[str, float]]], limit: float = QUIET_STEAL_CORES) -> list[int]:
    """The rounds in which the hypervisor took at most `limit` cores from each of the users, zo and together
    windows (host CPU steal; a round without a steal reading counts as not quiet)."""
    phases = [cpu_by_window.get(p, []) for p in ("users", "zo", "together")]
    rounds = min((len(w) for w in phases), default=0)
    return [
        k for k in range(rounds)
        if all(w[k].get("host_steal") is not None and w[k]["host_steal"] <= limit for w in phases)
    ]


def quiet_round_figures(raw: Raw) -> dict:
    """Diagnostic: the two ratios over the quiet rounds' windows only (p99 over their pooled requests, steps/s
    over their pooled windows), to tell the service's figures from a host that took cores away."""
    rounds = quiet_rounds(raw.cpu_by_window)
    if not rounds:
        return {"quiet_rounds": [], "user_ttft_p99_ratio_quiet_rounds": None, "zo_steps_ratio_quiet_rounds": None}
    quiet = {phase: Windows(tuple(list(windows)[k] for k in rounds)) for phase, windows in raw.phases.items()}
    return {
        "quiet_rounds": rounds,
        "user_ttft_p99_ratio_quiet_rounds": _ttft_p99_ratio(raw.samples, quiet["users"], quiet["together"]),
        "zo_steps_ratio_quiet_rounds": _zo_steps_ratio(raw.steps_by_job, quiet["zo"], quiet["together"]),
    }


def _median(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return float(np.median(known)) if known else None


def _ratio(a, b):
    return a / b if a is not None and b else None


def _meets(key: str, value) -> bool | None:
    if value is None:
        return None
    op, bound = TARGETS[key]
    return value <= bound if op == "<=" else value >= bound


def summarise(args, raw: Raw, engine, num_engine_deaths: int) -> dict:
    users, together = phase_users(raw, "users"), phase_users(raw, "together")
    zo_alone = zo_summary(raw.steps_by_job, raw.phases["zo"])
    zo_together = zo_summary(raw.steps_by_job, raw.phases["together"])
    user_tokens = sum(
        s.num_prompt_tokens + s.num_output_tokens for s in raw.samples if s.phase == "together" and s.done_s in raw.phases["together"]
    )
    all_tokens = zo_together["num_tokens"] + user_tokens
    fair_errors = [e for e in (zo_alone["fair_share_error"], zo_together["fair_share_error"]) if e is not None]
    by_round = ttft_p99_ratio_by_round(raw.samples, raw.phases["users"], raw.phases["together"])
    zo_by_round = zo_steps_ratio_by_round(raw.steps_by_job, raw.phases["zo"], raw.phases["together"])
    figures = {
        "user_ttft_p99_ratio": _ratio(together["ttft_p99_ms"], users["ttft_p99_ms"]),
        # Diagnostic (--rounds > 1): the median over rounds of each round's together / alone p99.
        "user_ttft_p99_ratio_median_of_rounds": _median(by_round),
        "user_ttft_p99_ratio_by_round": by_round,
        "user_ttft_p99_ratio_sent_on_time": _ratio(together["ttft_p99_ms_sent_on_time"], users["ttft_p99_ms_sent_on_time"]),
        "user_e2e_p99_ratio": _ratio(together["e2e_p99_ms"], users["e2e_p99_ms"]),
        "zo_steps_ratio": _ratio(zo_together["steps_per_s"], zo_alone["steps_per_s"]),
        "zo_steps_ratio_median_of_rounds": _median(zo_by_round),  # diagnostic, as the TTFT one
        "zo_steps_ratio_by_round": zo_by_round,
        # Diagnostic: cores the hypervisor took from this machine in each phase's windows (CPU steal); a
        # round whose users or together window lost cores this way reads slow for that reason.
        "host_steal_cores_by_round": {
            phase: [w.get("host_steal") for w in windows] for phase, windows in raw.cpu_by_window.items()
        },
        **quiet_round_figures(raw),
        "zo_token_share": zo_together["num_tokens"] / all_tokens if all_tokens else None,
        "fair_share_error": max(fair_errors) if fair_errors else None,
    }

    def controller_view(windows: Windows) -> dict:
        rows = [r for r in raw.runtime_rows if r["t"] in windows]

        def median(key: str) -> float | None:
            values = [r[key] for r in rows if r.get(key) is not None]
            return float(np.median(values)) if values else None

        reasons: dict[str, int] = {}
        for r in rows:
            if r["budget_reason"]:
                reasons[r["budget_reason"]] = reasons.get(r["budget_reason"], 0) + 1
        return {
            **raw.stalls.view(windows),
            "budget_tokens_median": median("budget_tokens"),
            "probe_tokens_in_flight_median": median("probe_tokens_in_flight"),
            "server_ttft_p95_ms_median": median("server_ttft_p95_ms"),
            "probe_cap_tokens_median": median("probe_cap_tokens"),  # the per-step cap next to users
            "host_steal_peak_cores": steal_peak_cores(raw.runtime_rows, windows),
            "budget_reason_samples": reasons,
        }

    result = {
        "benchmark": "coserve",
        **figures,
        "targets": {k: f"{op} {bound}" for k, (op, bound) in TARGETS.items()},
        "targets_met": {k: _meets(k, figures[k]) for k in TARGETS},
        "fair_share_error_by_phase": {"zo": zo_alone["fair_share_error"], "together": zo_together["fair_share_error"]},
        "paper_ttft_p99_increase": PAPER_TTFT_P99_INCREASE,
        "engine_dead_errors": num_engine_deaths,
        "engine_healthy_at_end": raw.engine_healthy,
        "user_errors": users["num_errors"] + together["num_errors"],
        "jobs_status_before_cancel": raw.job_states,
        "config": {
            "model": args.model, "dtype": args.dtype, "num_slots": args.num_slots, "output_tokens": args.output_tokens,
            "load_fraction": args.load_fraction if args.users_rate_per_s is None else "fixed rate (--users-rate-per-s)", "rate_per_s": raw.rate_per_s, "phase_s": raw.phase_s, "rounds": args.rounds, "seed": args.seed,
            "zo_batch_size": args.zo_batch_size, "zo_num_directions": args.zo_q, "zo_options": args.zo_options or "job default",
            "coscheduler_target_ttft_ms": args.target_ttft_ms if args.target_ttft_ms is not None else "service default",
            "coscheduler_chunk_tokens": args.chunk_tokens if args.chunk_tokens is not None else "service default",
            "coscheduler_min_chunks_in_flight": args.min_chunks if args.min_chunks is not None else "service default",
            "coscheduler_hold_chunks_while_users_wait": not args.no_hold,
            "min_probe_tokens_per_step": args.min_probe_tokens_per_step or "off (static step gate)",
            "shm_busy_loop_s": "vllm default (1 s)" if args.shm_busy_loop_s is None else args.shm_busy_loop_s,
            "cpu_threads": args.cpu_threads if args.cpu_threads is not None else "service default (cores - 1)",
            "pin_worker_cpus": args.pin_worker_cpus or "not pinned",
            "load_client": args.load_client,
            "engine_nice": args.engine_nice if args.engine_nice is not None else "service default (+10)",
            "step_gate": engine.step_gate.to_dict() if engine.step_gate else "off (vLLM's scheduler)",
            "probe_lane": engine.probe_lane,
            "batched_scoring": engine.batched_scoring,
            "worker_in_engine_core": engine.worker_in_engine_core,
            "max_num_batched_tokens": engine.max_num_batched_tokens, "max_num_seqs": engine.max_num_seqs,
        },
        "calibration": raw.calibration,
        "phases": {
            "users": {"users": users, "controller": controller_view(raw.phases["users"]), "cpu": raw.cpu_by_phase["users"]},
            "zo": {"zo": zo_alone, "controller": controller_view(raw.phases["zo"]), "cpu": raw.cpu_by_phase["zo"]},
            "together": {
                "users": together, "zo": zo_together, "user_tokens": user_tokens,
                "controller": controller_view(raw.phases["together"]), "cpu": raw.cpu_by_phase["together"],
            },
        },
    }
    if "together_b" in raw.phases:
        key = ab_key(args)
        result[key], result["phases"]["together_b"] = ab_figures(
            args, raw, figures, users["ttft_p99_ms"], zo_alone["steps_per_s"]
        )
        result["phases"]["together_b"]["controller"] = controller_view(raw.phases["together_b"])
        result["user_errors"] += result["phases"]["together_b"]["users"]["num_errors"]
    for name, by_window in raw.cpu_by_window.items():
        result["phases"][name]["cpu_by_round"] = by_window  # each window's own CPU and host steal, in order
    if raw.engine_steps:
        job_steps = {
            job: [(step["time"] - step["duration_s"], step["time"]) for step in steps]
            for job, (_, steps) in raw.steps_by_job.items()
        }
        for name, windows in raw.phases.items():
            result["phases"][name]["engine_steps"] = summarise_steps(raw.engine_steps, windows)
            if name != "users":
                result["phases"][name]["engine_steps"]["probe_idle"] = probe_idle(raw.engine_steps, windows, job_steps)
    return result


def phase_users(raw: Raw, phase: str) -> dict:
    """A user phase's summary with the load generator's lags, the server's TTFT stages and the joined path."""
    summary = user_summary([s for s in raw.samples if s.phase == phase], raw.phase_s)
    summary["load_generator"] = raw.client_stats.get(phase)
    summary["ttft_stages"] = raw.ttft_stages_by_phase.get(phase)
    summary["ttft_path"] = raw.ttft_paths_by_phase.get(phase)
    return summary


def ab_key(args) -> str:
    """Where the figures of the run's A/B go in the JSON."""
    if getattr(args, "ab_fast_paths", False):
        return "ab_fast_paths"
    if getattr(args, "ab_pipelined_commits", False):
        return "ab_pipelined_commits"
    return "ab_gate"


def ab_figures(
    args, raw: Raw, figures: dict, users_ttft_p99_ms: float | None, zo_alone_steps_per_s: float
) -> tuple[dict, dict]:
    """With an A/B inside the run: the ratios of each variant, each against the same users-alone and ZO-alone
    windows, and the `together_b` phase's own summary. `--ab-gate-tokens`: `together` at `--step-gate-tokens`,
    `together_b` at the A/B cap (`gate_tokens`); `--ab-fast-paths`: `together` with the engine's vectorised
    per-step paths, `together_b` with vLLM's own (`fast_paths`); `--ab-pipelined-commits`: `together` with
    pipelined commits, `together_b` with each commit before the next step (`pipelined_commits`)."""
    users_w, zo_w, b_w = raw.phases["users"], raw.phases["zo"], raw.phases["together_b"]
    b_users = phase_users(raw, "together_b")
    b_zo = zo_summary(raw.steps_by_job, b_w)
    key = ab_key(args)
    if key == "ab_gate":
        variant = {"gate_tokens": {"together": args.step_gate_tokens, "together_b": args.ab_gate_tokens}}
    else:  # a switch, on in `together` and off in `together_b`: "fast_paths", "pipelined_commits"
        variant = {key.removeprefix("ab_"): {"together": True, "together_b": False}}
    ab = {
        **variant,
        "user_ttft_p99_ratio": {
            "together": figures["user_ttft_p99_ratio"], "together_b": _ratio(b_users["ttft_p99_ms"], users_ttft_p99_ms),
        },
        "user_ttft_p99_ratio_by_round": {
            "together": figures["user_ttft_p99_ratio_by_round"],
            "together_b": ttft_p99_ratio_by_round(raw.samples, users_w, b_w, "together_b"),
        },
        "zo_steps_ratio": {
            "together": figures["zo_steps_ratio"], "together_b": _ratio(b_zo["steps_per_s"], zo_alone_steps_per_s),
        },
        "zo_steps_ratio_by_round": {
            "together": figures["zo_steps_ratio_by_round"],
            "together_b": zo_steps_ratio_by_round(raw.steps_by_job, zo_w, b_w),
        },
        "fair_share_error": {"together_b": b_zo["fair_share_error"]},
    }
    return ab, {"users": b_users, "zo": b_zo, "cpu": raw.cpu_by_phase.get("together_b")}
