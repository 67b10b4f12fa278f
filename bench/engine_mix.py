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
machine drifts, so repeat the pair).

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
from scheduler.planning.step_gate import StepGateConfig  # noqa: E402
from scheduler.scoring import ScoringSequence  # noqa: E402
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir  # noqa: E402

NUM_STATES = 6  # slots 0-2 serve users, 3-5 hold probe states


def summarise(records: list[StepRecord], start_s: float, end_s: float) -> dict:
    """bench/coserve.py's per-kind step summary, with the median scheduling and output-update time added."""
    summary = summarise_steps(records, Windows.of(start_s, end_s))
    inside = [r for r in records if start_s <= r.schedule_start_s < end_s]
    for kind in KINDS:
        if kind not in summary:
            continue
        of_kind = [r for r in inside if step_kind(r) == kind]
        summary[kind]["schedule_p50_ms"] = statistics.median(r.schedule_end_s - r.schedule_start_s for r in of_kind) * 1e3
        summary[kind]["update_p50_ms"] = statistics.median(r.update_end_s - r.update_start_s for r in of_kind) * 1e3
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

        async def user(k: int) -> None:
            while time.monotonic() < stop_at:
                prompt = [2] + [rng.randrange(4, 2000) for _ in range(args.prompt_tokens)]
                async for _ in binding.generate(
                    prompt, max_tokens=16, temperature=args.user_temperature, top_p=1.0, seed=None, stop=None,
                    slot=binding.slot_ids[k % 3], salt=f"user-{k}", priority=USER_PRIORITY,
                ):
                    pass
                counts["users"] += 1

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
        before, t0 = dict(counts), time.time()
        await asyncio.sleep(args.seconds)
        after, t1 = dict(counts), time.time()
        await asyncio.gather(*tasks)
    finally:
        binding.shutdown()
    steps = summarise(load_steps(os.environ[TRACE_ENV]), t0, t1)
    span = t1 - t0
    return {
        "benchmark": "engine_mix",
        "mode": args.mode,
        "users_completions_per_s": (after["users"] - before["users"]) / span,
        "probe_sequences_per_s": (after["probe_sequences"] - before["probe_sequences"]) / span,
        "steps_per_s": steps["num_steps"] / span,
        "steps": {kind: steps[kind] for kind in KINDS if kind in steps},
        "config": {k: v for k, v in vars(args).items() if k != "json"},
    }


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
    parser.add_argument("--user-temperature", type=float, default=1.0)
    parser.add_argument("--step-gate-tokens", type=int, default=256)
    parser.add_argument("--cpu-threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(run(args))
    for kind, row in result["steps"].items():
        print(
            f"{kind:18s} {row['share_of_time']:4.0%} of time  forward p50 {row['forward_p50_ms']:.2f} ms  "
            f"probe tokens {row['probe_tokens_mean']:.0f}  user tokens {row['user_tokens_mean']:.1f}"
        )
    print(f"users {result['users_completions_per_s']:.1f} completions/s, probes {result['probe_sequences_per_s']:.0f} sequences/s")
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
