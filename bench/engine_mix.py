"""Engine only: users decoding next to ZO probe batches, and what each kind of engine step costs.

No service and no HTTP: one engine (the service's defaults: the model in the engine core, one torch thread,
the step gate, batched scoring, 16 slots) and, in this process, closed-loop streaming users (16 output
tokens, temperature 1 as in bench/coserve.py, on three LoRA slots) and closed-loop probe scorers (batches of
short sequences with two candidate tokens, on three other slots, at the probe priority). `--mode` picks who
runs: `users`, `probes` or `together`. After a warm-up it measures `--seconds` of the engine's step trace
(scheduler/engine/step_trace.py) and prints, per kind of step, bench/coserve.py's step summary
(bench/coserve_parts/steps.py: periods, shares of time, forward time, tokens carried) with the median
scheduling and output-update times added, and the users' completions and probe sequences per second. Made
for side-by-side comparisons of engine-side changes (run it once per variant, one after the other; the
machine drifts, so repeat the pair). A setting the model process can change while it runs is compared in one
run instead: `--ab-switch-interval S` alternates `--ab-window-s` windows at the GIL switch interval vLLM
starts with and at S, and reports each variant over its own windows; `--ab-fast-paths` alternates windows with
zoserve's vectorised per-step paths (scheduler/engine/cpu_fast_paths.py) and windows with vLLM's own.
`--user-think-s` pauses each user between requests (exponential, that mean), so users arrive at the engine
while steps run, as in production, and the users' TTFT percentiles say what a change does to them.

    .venv/bin/python bench/engine_mix.py --mode together --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from coserve_parts.steps import KINDS, load_steps, step_kind, summarise_steps  # noqa: E402
from coserve_parts.windows import Windows  # noqa: E402

from scheduler.engine.binding import USER_PRIORITY, EngineBinding  # noqa: E402
from scheduler.engine.config import PROBE_PRIORITY, EngineConfig  # noqa: E402
from scheduler.engine.step_trace import TRACE_ENV, StepRecord  # noqa: E402
from scheduler.models.tiny import ensure_model  # noqa: E402
from scheduler.planning import percentile_ms  # noqa: E402
from scheduler.planning.step_gate import StepGateConfig  # noqa: E402
from scheduler.scoring import ScoringSequence  # noqa: E402
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir  # noqa: E402

NUM_STATES = 6  # slots 0-2 serve users, 3-5 hold probe states


def _ttft_percentiles(ttfts_s: list[float]) -> dict:
    if not ttfts_s:
        return {}
    ms = [1e3 * t for t in ttfts_s]
    return {"num_user_requests": len(ms), **{f"ttft_p{round(q * 100)}_ms": percentile_ms(ms, q) for q in (0.5, 0.9, 0.99)}}


def summarise_windows(records: list[StepRecord], spans: Windows) -> dict:
    """bench/coserve.py's per-kind step summary over `spans`, with the median scheduling and output-update
    time added."""
    summary = summarise_steps(records, spans)
    inside = [r for r in records if r.schedule_start_s in spans]
    for kind in KINDS:
        if kind not in summary:
            continue
        of_kind = [r for r in inside if step_kind(r) == kind]
        summary[kind]["schedule_p50_ms"] = statistics.median(r.schedule_end_s - r.schedule_start_s for r in of_kind) * 1e3
        summary[kind]["update_p50_ms"] = statistics.median(r.update_end_s - r.update_start_s for r in of_kind) * 1e3
        if of_kind[0].thread_cpu_s is not None:
            summary[kind]["thread_cpu_p50_ms"] = statistics.median(r.thread_cpu_s for r in of_kind) * 1e3
    return summary


async def _write_states(binding: EngineBinding, model: str) -> None:
    layout = layout_for_model_dir(model, LoraShape(4, 16.0, ("q_proj", "v_proj")))
    for i in range(NUM_STATES):
        theta = initial_state(layout, i)
        generator = torch.Generator().manual_seed(i)
        for spec in layout.tensors:
            if spec.kind == "B":  # non-zero B: every slot adds a real LoRA product
                theta[spec.name] = torch.randn(spec.shape, generator=generator) * 0.1
        await binding.set_state(f"mix-{i}", layout, theta)
        await binding.write_state(f"mix-{i}", binding.slot_ids[i])


async def run(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="zoserve-engine-mix-"))
    os.environ[TRACE_ENV] = str(work / "steps")
    model = str(ensure_model(args.model))
    config = EngineConfig(
        model=model, num_slots=16, num_cpu_threads=args.cpu_threads,
        step_gate=StepGateConfig(probe_priority=PROBE_PRIORITY, tokens_with_users=args.step_gate_tokens),
    )
    binding = await EngineBinding.start(config, work)
    try:
        await _write_states(binding, model)
        rng = random.Random(args.seed)
        stop_at = time.monotonic() + args.warmup_s + args.seconds + 1.0
        counts = {"users": 0, "probe_sequences": 0}
        ttfts: list[tuple[float, float]] = []  # (sent, time to first output) per user request

        async def user(k: int) -> None:
            while time.monotonic() < stop_at:
                prompt = [2] + [rng.randrange(4, 2000) for _ in range(args.prompt_tokens)]
                sent_s, first_s = time.time(), None
                async for _ in binding.generate(
                    prompt, max_tokens=16, temperature=args.user_temperature, top_p=1.0, seed=None, stop=None,
                    slot=binding.slot_ids[k % 3], salt=f"user-{k}", priority=USER_PRIORITY,
                ):
                    if first_s is None:
                        first_s = time.time()
                counts["users"] += 1
                if first_s is not None:
                    ttfts.append((sent_s, first_s - sent_s))
                if args.user_think_s:
                    await asyncio.sleep(rng.expovariate(1.0 / args.user_think_s))

        async def scorer(k: int) -> None:
            batch = 0
            while time.monotonic() < stop_at:
                sequences = [
                    ScoringSequence(tuple([2] + [rng.randrange(4, 2000) for _ in range(args.prompt_tokens)]), candidate_ids=(7, 9))
                    for _ in range(args.batch_sequences)
                ]
                await binding.score(sequences, binding.slot_ids[3 + k % 3], salt=f"probe-{k}-{batch}")
                batch += 1
                counts["probe_sequences"] += len(sequences)

        tasks = []
        if args.mode in ("users", "together"):
            tasks += [asyncio.ensure_future(user(k)) for k in range(args.users)]
        if args.mode in ("probes", "together"):
            tasks += [asyncio.ensure_future(scorer(k)) for k in range(args.scorers)]
        await asyncio.sleep(args.warmup_s)
        variants = {"default": await binding.switch_interval()}
        fast_paths = {"default": await binding.fast_paths()}
        if args.ab_switch_interval is not None:
            variants["ab"] = args.ab_switch_interval
        if args.ab_fast_paths:
            variants["ab"] = variants["default"]
            fast_paths["ab"] = ()  # vLLM's own per-step paths
        spans: dict[str, list[tuple[float, float, dict, dict]]] = {name: [] for name in variants}
        end_at = time.monotonic() + args.seconds
        turn = 0
        while time.monotonic() < end_at:  # the variants take turns, so the machine's drift reaches both alike
            name = list(variants)[turn % len(variants)]
            await binding.switch_interval(variants[name])
            if args.ab_fast_paths:
                await binding.fast_paths(bool(fast_paths[name]))
            await asyncio.sleep(0.2)  # settle: the step running at the switch belongs to neither
            before, t0 = dict(counts), time.time()
            await asyncio.sleep(args.ab_window_s if len(variants) > 1 else args.seconds)
            spans[name].append((t0, time.time(), before, dict(counts)))
            turn += 1
        await binding.switch_interval(variants["default"])
        if args.ab_fast_paths:
            await binding.fast_paths(True)
        await asyncio.gather(*tasks)
    finally:
        binding.shutdown()
    records = load_steps(os.environ[TRACE_ENV])
    result = {"benchmark": "engine_mix", "mode": args.mode, "switch_intervals": variants,
              "fast_paths": {name: list(fast_paths.get(name, fast_paths["default"])) for name in variants}}
    for name, windows in spans.items():
        measured = Windows(tuple((t0, t1) for t0, t1, _, _ in windows))
        steps = summarise_windows(records, measured)
        span = measured.duration_s
        result[name] = {
            "seconds": span,
            "users_completions_per_s": sum(a["users"] - b["users"] for _, _, b, a in windows) / span,
            "probe_sequences_per_s": sum(a["probe_sequences"] - b["probe_sequences"] for _, _, b, a in windows) / span,
            "steps_per_s": steps["num_steps"] / span,
            "steps": {kind: steps[kind] for kind in KINDS if kind in steps},
            **_ttft_percentiles([t for sent, t in ttfts if sent in measured]),
        }
    result["config"] = {k: v for k, v in vars(args).items() if k != "json"}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("users", "probes", "together"), default="together")
    parser.add_argument("--model", default="tiny-opt")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup-s", type=float, default=3.0)
    parser.add_argument("--users", type=int, default=8, help="concurrent closed-loop streaming users")
    parser.add_argument("--scorers", type=int, default=4, help="concurrent closed-loop probe scorers")
    parser.add_argument("--batch-sequences", type=int, default=6, help="sequences per probe batch")
    parser.add_argument("--prompt-tokens", type=int, default=21)
    parser.add_argument("--user-think-s", type=float, default=0.0, help="mean pause (exponential) between a user's requests")
    parser.add_argument("--user-temperature", type=float, default=1.0)
    parser.add_argument("--step-gate-tokens", type=int, default=256)
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--ab-switch-interval", type=float, default=None,
        help="A/B in one run: windows at the engine's default GIL switch interval take turns with windows at this one",
    )
    parser.add_argument(
        "--ab-fast-paths", action="store_true",
        help="A/B in one run: windows with zoserve's vectorised per-step paths (engine/cpu_fast_paths.py) take "
             "turns with windows running vLLM's own",
    )
    parser.add_argument("--ab-window-s", type=float, default=2.0, help="length of each A/B window")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.ab_fast_paths and args.ab_switch_interval is not None:
        parser.error("--ab-fast-paths and --ab-switch-interval are two different A/Bs: give one")
    result = asyncio.run(run(args))
    for name, interval in result["switch_intervals"].items():
        variant = result[name]
        paths = ", ".join(result["fast_paths"][name]) or "vLLM's own"
        print(f"{name}: GIL switch interval {interval * 1e3:g} ms, per-step paths: {paths}, {variant['seconds']:.0f} s measured")
        for kind, row in variant["steps"].items():
            print(
                f"  {kind:18s} {row['share_of_time']:4.0%} of time  period p50 {row['period_p50_ms']:.2f} ms  "
                f"forward p50 {row['forward_p50_ms']:.2f} ms  CPU p50 {row.get('thread_cpu_p50_ms', 0):.2f} ms  probe tokens {row['probe_tokens_mean']:.0f}  "
                f"user tokens {row['user_tokens_mean']:.1f}"
            )
        print(
            f"  users {variant['users_completions_per_s']:.1f} completions/s, "
            f"TTFT p50 / p90 / p99 {variant.get('ttft_p50_ms', 0):.1f} / {variant.get('ttft_p90_ms', 0):.1f} / "
            f"{variant.get('ttft_p99_ms', 0):.1f} ms, probes {variant['probe_sequences_per_s']:.0f} sequences/s"
        )
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
