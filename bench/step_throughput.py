"""MeZO step throughput: the engine path vs the transformers+PEFT baseline loop, side by side in one run.

OPT-125m shape (random weights), SST-2 dev sentences, batch 16, q = 1, two single-token options
(" terrible" / " great"), same dtype on both sides. For each dtype it measures, in order:
  engine   — full MeZO steps through the engine (probe writes on the worker, 2q·B scoring, update);
  lora_fwd — the same 2q·B sequences scored under LoRA slots without probe writes or updates;
  bare_fwd — the same sequences through the base model (no LoRA): the engine's bare forward;
  baseline — full MeZO steps of the baseline loop (after the engine has been shut down).
Prints a human summary and, with --json, a JSON object as the last line.

    .venv/bin/python bench/step_throughput.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.baseline import BaselineConfig, BaselineMezoTrainer  # noqa: E402
from scheduler.datasets import load_sst2  # noqa: E402
from scheduler.engine.binding import EngineBinding  # noqa: E402
from scheduler.engine.config import EngineConfig  # noqa: E402
from scheduler.models.tiny import ensure_model  # noqa: E402
from scheduler.objectives import ClassificationObjective  # noqa: E402
from scheduler.sampling import batch_indices  # noqa: E402
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir  # noqa: E402
from scheduler.zo.mezo import MezoHyper  # noqa: E402
from scheduler.engine_step import run_engine_step  # noqa: E402
from scheduler.zo.methods import SgdHyper, build_method  # noqa: E402

JOB_SEED = 17


async def _engine_phase(args, model: str, dtype: str, layout, theta0) -> dict:
    hyper = MezoHyper(lr=1e-4, eps=1e-3, num_directions=args.q)
    binding = await EngineBinding.start(
        EngineConfig(model=model, dtype=dtype, num_slots=2 * args.q + 2, max_model_len=512, kv_cache_gib=2)
    )
    try:
        data = ClassificationObjective().encode(binding.tokenizer, load_sst2("dev"), 512)
        if not data.single_token_options:
            raise SystemExit("the benchmark expects single-token options for this tokenizer")
        method = build_method("mezo-sgd", SgdHyper(hyper.lr, hyper.eps, hyper.num_directions))
        await binding.set_state("bench", layout, theta0, ("mezo-sgd", (("num_directions", args.q),)))
        slots = binding.slot_ids[: 2 * args.q]

        async def engine_step(step: int) -> float:
            outcome = await run_engine_step(
                binding, "bench", data, method, hyper.lr, job_seed=JOB_SEED, step=step, batch_size=args.batch_size,
                slots=slots, salt="bench",
            )
            return outcome.duration_s

        async def scored(step: int, lora: bool) -> float:
            sequences = data.sequences(batch_indices(JOB_SEED, step, args.batch_size, len(data)))
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    binding.score(sequences, slots[i] if lora else None, salt=f"{lora}:{step}:{i}")
                    for i in range(2 * args.q)
                )
            )
            return time.perf_counter() - started

        for step in range(args.warmup):
            await engine_step(step)
            await scored(step, True)
            await scored(step, False)
        engine_s, lora_s, bare_s = [], [], []
        # Interleave the three so that machine noise hits them alike.
        for step in range(args.warmup, args.warmup + args.steps):
            engine_s.append(await engine_step(step))
            lora_s.append(await scored(step, True))
            bare_s.append(await scored(step, False))
        num_tokens = sum(
            2 * args.q * sum(len(s.token_ids) for s in data.sequences(batch_indices(JOB_SEED, st, args.batch_size, len(data))))
            for st in range(args.warmup, args.warmup + args.steps)
        )
        return {"engine_step_s": engine_s, "lora_forward_s": lora_s, "bare_forward_s": bare_s, "num_tokens": num_tokens}
    finally:
        binding.shutdown()


def _baseline_phase(args, model: str, dtype: str, layout, theta0) -> dict:
    hyper = MezoHyper(lr=1e-4, eps=1e-3, num_directions=args.q)
    trainer = BaselineMezoTrainer(BaselineConfig(model, dtype=dtype), layout, theta0)
    data = ClassificationObjective().encode(trainer.tokenizer, load_sst2("dev"), 512)
    for step in range(args.warmup):
        trainer.step(data, hyper, job_seed=JOB_SEED, step=step, batch_size=args.batch_size)
    times = [
        trainer.step(data, hyper, job_seed=JOB_SEED, step=step, batch_size=args.batch_size).duration_s
        for step in range(args.warmup, args.warmup + args.steps)
    ]
    return {"baseline_step_s": times}


def _summary(engine: dict, baseline: dict) -> dict:
    engine_step = statistics.median(engine["engine_step_s"])
    baseline_step = statistics.median(baseline["baseline_step_s"])
    bare = statistics.median(engine["bare_forward_s"])
    lora = statistics.median(engine["lora_forward_s"])
    return {
        "engine_steps_per_s": 1.0 / engine_step,
        "baseline_steps_per_s": 1.0 / baseline_step,
        "engine_step_s_median": engine_step,
        "baseline_step_s_median": baseline_step,
        "bare_forward_s_median": bare,
        "lora_forward_s_median": lora,
        "ratio_vs_baseline": baseline_step / engine_step,
        "overhead_vs_bare_forward": engine_step / bare,
        "overhead_vs_lora_forward": engine_step / lora,
        "engine_tokens_per_s": engine["num_tokens"] / sum(engine["engine_step_s"]),
        "raw": {**engine, **baseline},
    }


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="opt-125m-shape")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--q", type=int, default=1)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model = str(ensure_model(args.model))
    layout = layout_for_model_dir(model, LoraShape(8, 16.0, ("q_proj", "v_proj")))
    theta0 = initial_state(layout, seed=5)
    by_dtype = {}
    for dtype in args.dtypes.split(","):
        engine = await _engine_phase(args, model, dtype, layout, theta0)
        baseline = _baseline_phase(args, model, dtype, layout, theta0)
        by_dtype[dtype] = _summary(engine, baseline)
        s = by_dtype[dtype]
        print(
            f"{dtype}: engine {s['engine_steps_per_s']:.3f} steps/s, baseline {s['baseline_steps_per_s']:.3f} steps/s, "
            f"ratio {s['ratio_vs_baseline']:.2f}x; step/bare forward {s['overhead_vs_bare_forward']:.3f}, "
            f"step/LoRA forward {s['overhead_vs_lora_forward']:.3f}",
            flush=True,
        )
    result = {
        "benchmark": "step_throughput",
        "model": args.model,
        "batch_size": args.batch_size,
        "num_directions": args.q,
        "steps": args.steps,
        # Headline figures are the worst over the dtypes measured.
        "ratio_vs_baseline": min(s["ratio_vs_baseline"] for s in by_dtype.values()),
        "overhead_vs_bare_forward": max(s["overhead_vs_bare_forward"] for s in by_dtype.values()),
        "by_dtype": by_dtype,
    }
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    asyncio.run(main())
