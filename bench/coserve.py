"""Co-serving: user latency and ZO progress when two training jobs share the engine with live traffic.

One run drives the real service in-process (uvicorn on 127.0.0.1, requests over real HTTP): three served
adapters for users, two training jobs (weights 1 and 2) on two more adapters. In order:
  calibrate — closed-loop saturation with streaming completions alone: the service's completion capacity;
  users     — open-loop Poisson arrivals (fixed seed) at `--load-fraction` x capacity, streaming completions
              of `--output-tokens` tokens, adapters round-robin; nothing else runs;
  zo        — the two jobs alone, for as long as the users phase;
  together  — the same arrival sequence again, with both jobs running.
User load comes from a separate client process (its own event loop). Time to first token (TTFT) is taken at
the client, from the scheduled arrival time to the first SSE chunk that
carries text; end-to-end (e2e) to `[DONE]`. ZO step rates and scoring tokens come from the jobs' step metrics
(`GET /v1/jobs/{id}/metrics`), counted by step completion time inside each phase's window.
With `--rounds N` the three phases take turns in N rounds of 1/N of the phase length (users, zo, together,
users, ...; the jobs paused and drained for each later users window) and each figure is taken over a phase's
N windows, so the machine's drift over the run reaches every phase alike (coserve_parts/windows.py).

Figures (the JSON's last line with --json):
  user_ttft_p99_ratio  p99 TTFT together / p99 TTFT users alone     (target <= 1.25)
  user_e2e_p99_ratio   p99 e2e together / p99 e2e users alone
  zo_steps_ratio       steps/s of both jobs together / steps/s of both jobs alone (target >= 0.5)
  zo_token_share       ZO scoring tokens / (ZO scoring tokens + user prompt and output tokens), together phase
  fair_share_error     |tokens of the weight-2 job / tokens of both jobs - 2/3|, worst of the zo and together
                       phases (target <= 0.10)
  user_ttft_p99_ratio_median_of_rounds   diagnostic: the median over rounds of round k's together p99 TTFT /
                       its users-alone p99 (with --rounds > 1; a slow stretch of the machine then moves one round)

    .venv/bin/python bench/coserve.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import logging
import sys
from dataclasses import asdict
from pathlib import Path

# The repository (scheduler, service) and bench/ (coserve_parts); the load generator's spawned process starts
# with this sys.path and imports coserve_parts.load from it.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from service.settings import Settings  # noqa: E402

from coserve_parts.measure import run  # noqa: E402
from coserve_parts.plot import plot  # noqa: E402
from coserve_parts.steps import KINDS  # noqa: E402
from coserve_parts.summary import SENT_LATE_S  # noqa: E402


def _gate_arg(text: str) -> int | None:
    return None if text == "off" else int(text)


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _busy_loop_arg(text: str) -> float | None:
    return None if text == "vllm" else float(text)


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def print_summary(result: dict) -> None:
    users = result["phases"]["users"]["users"]
    together = result["phases"]["together"]["users"]
    zo, zo_t = result["phases"]["zo"]["zo"], result["phases"]["together"]["zo"]
    cal = result["calibration"]
    print(f"calibration: {cal['completions_per_s']:.1f} completions/s at concurrency {cal['concurrency']}; load {result['config']['rate_per_s']:.2f}/s")
    for name, u in (("users alone", users), ("together", together)):
        print(
            f"{name:12s} {u['num_requests']} requests ({u['num_errors']} errors, {u['num_without_text']} without text): TTFT p50 {_fmt(u['ttft_p50_ms'], '.1f')} "
            f"p99 {_fmt(u['ttft_p99_ms'], '.1f')} ms, e2e p50 {_fmt(u['e2e_p50_ms'], '.1f')} p99 {_fmt(u['e2e_p99_ms'], '.1f')} ms"
        )
    for name, z in (("zo alone", zo), ("together", zo_t)):
        shares = ", ".join(f"{k} {_fmt(j['token_share'], '.3f')}" for k, j in z["jobs"].items())
        print(f"{name:12s} ZO {z['steps_per_s']:.2f} steps/s, {z['tokens_per_s']:.0f} scoring tokens/s; token shares {shares}")
    for key in ("user_ttft_p99_ratio", "user_e2e_p99_ratio", "zo_steps_ratio", "zo_token_share", "fair_share_error"):
        met = result["targets_met"].get(key)
        note = "" if met is None else (f"  (target {result['targets'][key]}: {'met' if met else 'MISSED'})")
        print(f"{key:20s} {_fmt(result[key])}{note}")
    ab = result.get("ab_gate") or result.get("ab_fast_paths") or result.get("ab_pipelined_commits")
    if ab:
        for name in ("together", "together_b"):
            if "gate_tokens" in ab:
                variant = f"A/B gate {name:10s} {ab['gate_tokens'][name]} tokens"
            elif "pipelined_commits" in ab:
                mode = "pipelined" if ab["pipelined_commits"][name] else "before the next step"
                variant = f"A/B commits {name:10s} {mode}"
            else:
                variant = f"A/B per-step paths {name:10s} {'zoserve' if ab['fast_paths'][name] else 'vLLM'}"
            print(f"{variant}: user_ttft_p99_ratio {_fmt(ab['user_ttft_p99_ratio'][name])} "
                  f"(rounds {', '.join(_fmt(r) for r in ab['user_ttft_p99_ratio_by_round'][name])}), "
                  f"zo_steps_ratio {_fmt(ab['zo_steps_ratio'][name])} "
                  f"(rounds {', '.join(_fmt(r) for r in ab['zo_steps_ratio_by_round'][name])})")
    print(f"diagnostic: TTFT p99 ratio over requests the load generator sent on time (<= {SENT_LATE_S * 1000:.0f} ms late): "
          f"{_fmt(result['user_ttft_p99_ratio_sent_on_time'])}")
    if len(result["user_ttft_p99_ratio_by_round"]) > 1:
        print(f"diagnostic: TTFT p99 ratio per round {', '.join(_fmt(r) for r in result['user_ttft_p99_ratio_by_round'])}; "
              f"median {_fmt(result['user_ttft_p99_ratio_median_of_rounds'])}")
    for name in ("users", "together"):
        stages = result["phases"][name]["users"].get("ttft_stages") or {}
        for key in ("mean_ms", "slowest_1pct_mean_ms"):
            values = stages.get(key, {})
            print(f"TTFT stages, server, {name:8s} {key:20s} " + ", ".join(f"{k} {v:.2f}" for k, v in values.items()))
    for name in ("users", "together"):
        path = result["phases"][name]["users"].get("ttft_path") or {}
        for key in ("middle_tenth_mean_ms", "slowest_1pct_mean_ms"):
            values = path.get(key, {})
            print(f"TTFT path, client + server, {name:8s} {key:20s} " + ", ".join(f"{k} {v:.1f}" for k, v in values.items()))
    for name in ("users", "zo", "together"):
        steps = result["phases"][name].get("engine_steps") or {}
        kinds = ", ".join(
            f"{kind} {v['share_of_time']:.0%} of time, period p50/p99 {v['period_p50_ms']:.1f}/{v['period_p99_ms']:.1f} ms, "
            f"{v['probe_tokens_mean']:.0f} probe tokens"
            for kind, v in ((k, steps[k]) for k in KINDS if k in steps)
        )
        if kinds:
            print(f"engine steps, {name:9s} {steps['steps_per_s']:.0f}/s: {kinds}")
        threads = steps.get("main_thread")
        if threads:
            print(f"engine main thread, {name:9s} " + "; ".join(
                f"{which}: span {v['span_mean_ms']:.1f} ms, CPU {v['cpu']:.0%}, waiting for a core {v['runqueue_wait']:.0%}, "
                f"blocked {v['blocked']:.0%}, GC {v['gc']:.1%}" for which, v in threads.items()
            ))
        stalls = steps.get("gc_stalls")
        if stalls:
            print(f"engine GC stalls, {name:9s} {stalls['num_steps']} steps with > 2 ms in the collector, {stalls['gc_s']:.2f} s in all")
        idle = steps.get("probe_idle")
        if idle:
            spells = idle["spells"]
            print(f"engine without probe work, {name:9s} {idle['share_of_time']:.1%} of time (a job between steps "
                  f"{idle['a_job_between_steps']:.1%}, every job mid-step {idle['every_job_mid_step']:.1%}); "
                  f"{spells['num']} spells, p50/p90 {_fmt(spells['p50_ms'], '.0f')}/{_fmt(spells['p90_ms'], '.0f')} ms")
    for name in ("users", "zo", "together"):
        cpu = result["phases"][name]["cpu"]
        print(f"CPU s/s, {name:9s} " + ", ".join(f"{k} {v:.2f}" for k, v in sorted(cpu.items())))
    print(f"EngineDeadError records: {result['engine_dead_errors']}; engine healthy at end: {result['engine_healthy_at_end']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="tiny-opt", help="a locally built model: tiny-opt or opt-125m-shape")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--num-slots", type=int, default=16, help="3 users x 2 + 2 jobs x (2 serving + 2q probe) + 1")
    parser.add_argument("--output-tokens", type=int, default=16)
    parser.add_argument("--load-fraction", type=float, default=0.3)
    parser.add_argument(
        "--users-rate-per-s", type=float, default=None,
        help="offered user load in completions/s instead of --load-fraction x the calibrated capacity (A/B runs)",
    )
    parser.add_argument("--requests-per-phase", type=int, default=600)
    parser.add_argument("--min-phase-s", type=float, default=60.0)
    parser.add_argument("--max-phase-s", type=float, default=100.0)
    parser.add_argument("--calibrate-s", type=float, default=20.0)
    parser.add_argument("--calibrate-warmup-s", type=float, default=4.0)
    parser.add_argument("--calibrate-concurrency", type=int, default=32)
    parser.add_argument("--pause-s", type=float, default=3.0, help="idle time between calibration and the first phase")
    parser.add_argument("--zo-batch-size", type=int, default=16)
    parser.add_argument("--zo-q", type=int, default=1)
    parser.add_argument(
        "--zo-options", type=json.loads, default=None,
        help='the jobs\' verbalizers as a JSON list, e.g. \'[" bad", " great"]\' (default: the job default, " terrible" / " great")',
    )
    parser.add_argument("--zo-warmup-steps", type=int, default=3)
    parser.add_argument("--target-ttft-ms", type=float, default=None, help="co-scheduler TTFT target (default: the service's)")
    parser.add_argument(
        "--target-from-users", type=float, default=1.2,
        help="without --target-ttft-ms: set the co-scheduler target to this x the server-side p95 TTFT measured in the users-alone phase",
    )
    parser.add_argument(
        "--pin-worker-cpus", type=int, nargs="*", default=None,
        help="pin the process the model runs in (vLLM's worker or engine core) to these cores, every other process of the run to the rest",
    )
    parser.add_argument(
        "--load-client", choices=("httpx", "aiohttp"), default="httpx",
        help="the load generator's HTTP client (aiohttp: a C parser, less of the generator's own time in TTFT)",
    )
    parser.add_argument(
        "--engine-nice", type=int, default=None,
        help="run vLLM's processes at this nice value instead of the service's default (its own + 10); "
        "0: the same priority as the service (as before that default)",
    )
    parser.add_argument("--cpu-threads", type=int, default=None, help="the engine's OpenMP threads (default: the service's, every core but one)")
    parser.add_argument(
        "--shm-busy-loop-s", type=_busy_loop_arg, default=0.0,
        help="seconds vLLM's queue readers spin after a read ('vllm': vLLM's own 1 s; default 0, the service's)",
    )
    parser.add_argument("--no-probe-lane", action="store_true", help="submit probe requests as soon as admitted")
    parser.add_argument(
        "--no-batched-scoring", action="store_true",
        help="one vLLM request per probe sequence through AsyncLLM instead of one engine-core call per chunk",
    )
    parser.add_argument(
        "--worker-in-engine-core", choices=("on", "off"), default=None,
        help="run the model in vLLM's engine-core process (on) or a worker process (off); default: the service's",
    )
    parser.add_argument("--no-hold", action="store_true", help="let chunks enter while a user waits for its first token")
    parser.add_argument("--min-chunks", type=int, default=None, help="co-scheduler budget floor in chunks (default: the service's)")
    parser.add_argument("--chunk-tokens", type=int, default=None, help="co-scheduler probe chunk size (default: the service's)")
    parser.add_argument(
        "--step-gate-tokens", type=_gate_arg, default=Settings().step_gate_tokens_with_users,
        help="probe tokens per engine step while users are present, or 'off' for vLLM's own scheduler",
    )
    parser.add_argument(
        "--ab-gate-tokens", type=int, default=None,
        help="also run each round's together window at this per-step probe cap (phase 'together_b', same arrivals, "
        "the two windows' order alternating by round): an A/B of the gate inside one run; figures under 'ab_gate'",
    )
    parser.add_argument(
        "--ab-fast-paths", action="store_true",
        help="also run each round's together window with vLLM's own per-step paths instead of zoserve's vectorised "
        "ones (scheduler/engine/cpu_fast_paths.py; phase 'together_b', same arrivals, alternating order); "
        "figures under 'ab_fast_paths'",
    )
    parser.add_argument(
        "--ab-pipelined-commits", action="store_true",
        help="also run each round's together window with each step's commit ending before the job's next step goes "
        "in (phase 'together_b', same arrivals, alternating order); figures under 'ab_pipelined_commits'",
    )
    parser.add_argument("--step-gate-prefill-tokens", type=int, default=None,
                        help="probe tokens in a step that carries a user's prefill (default: the service's)")
    parser.add_argument("--max-num-batched-tokens", type=int, default=None, help="vLLM's per-step token budget (default: the service's)")
    parser.add_argument("--rolling-window-s", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=str(Path(__file__).resolve().parents[1] / "results" / "coserve.png"))
    parser.add_argument("--json-out", default=None, help="also write the JSON result to this file")
    parser.add_argument("--raw-out", default=None, help="write per-request samples, step metrics and controller samples here")
    parser.add_argument(
        "--min-probe-tokens-per-step", type=int, default=None,
        help="let the latency controller drive the per-step probe cap, down to this many tokens (default: static gate)",
    )
    parser.add_argument(
        "--no-step-trace", dest="step_trace", action="store_false",
        help="do not trace the engine's steps (by default every step is traced and summarised per phase)",
    )
    parser.add_argument(
        "--rounds", type=_positive_int, default=4,
        help="run the three phases in N rounds of 1/N of the phase length each (users, zo, together, users, ...) "
        "and measure each phase over its N windows: the machine's drift then reaches all three alike. The jobs "
        "are paused (their steps drained) for each later users window. 1: the phases once each, one after the "
        "other (sessions 1-11)",
    )
    parser.add_argument(
        "--resume-settle-s", type=float, default=3.0,
        help="with --rounds: seconds between resuming the jobs and opening the zo window. Longer than the 2 s for "
        "which the step gate and the co-scheduler still count users as present after the last one (at 1 s the "
        "first second of each zo window still ran with the gate closed and the budget at its floor)",
    )
    parser.add_argument("--smoke", action="store_true", help="seconds-long phases: checks the wiring, measures nothing")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if sum((args.ab_fast_paths, args.ab_pipelined_commits, args.ab_gate_tokens is not None)) > 1:
        parser.error("--ab-fast-paths, --ab-pipelined-commits and --ab-gate-tokens are different A/Bs: give one")
    if args.ab_gate_tokens is not None:
        if args.step_gate_tokens is None:
            parser.error("--ab-gate-tokens needs the step gate (--step-gate-tokens N, not 'off')")
        if args.min_probe_tokens_per_step is not None:
            parser.error("--ab-gate-tokens and --min-probe-tokens-per-step both set the per-step cap; pick one")
        if args.ab_gate_tokens < 0:
            parser.error("--ab-gate-tokens must be >= 0")
    if args.smoke:
        args.calibrate_s, args.calibrate_warmup_s, args.calibrate_concurrency = 3.0, 1.0, 8
        args.min_phase_s = args.max_phase_s = 6.0
        args.zo_warmup_steps, args.pause_s, args.rolling_window_s = 1, 0.5, 2.0
        args.rounds = min(args.rounds, 2)
    logging.basicConfig(level=logging.WARNING)
    result, raw = asyncio.run(asyncio.wait_for(run(args), 3600))
    gc.collect()  # finalise the shut-down engine now, not during interpreter teardown (noisy there)
    if args.plot:
        plot(Path(args.plot), raw.phases["users"].start, raw.phases, raw.samples, raw.steps_by_job, raw.runtime_rows, args.rolling_window_s)
    if args.raw_out:
        Path(args.raw_out).write_text(json.dumps({
            "phases": {name: windows.to_json() for name, windows in raw.phases.items()},  # [[start, end], ...]
            "samples": [{**asdict(s), "ttft_s": s.ttft_s, "e2e_s": s.e2e_s} for s in raw.samples],
            "steps": {adapter: steps for adapter, (_, steps) in raw.steps_by_job.items()},
            "runtime": raw.runtime_rows,
        }) + "\n")
    print_summary(result)
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(result, indent=2) + "\n")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
