"""Does ZO fine-tuning through the engine learn SST-2? Every method, one wall-clock budget each.

1. Base model: `scheduler.models.pretrain` ("sst2-opt", ~5M-parameter OPT), pre-trained with backprop as a
   causal LM on the unlabelled SST-2 train sentences (cached; ≤15 minutes on the 2-core CPU).
2. Data: 1,000 labelled training examples (500 per class, seeded), the MeZO/LoZO k-shot setting; all 872
   sentences of dev.tsv for evaluation. Prompt "<sentence> it was" with options " terrible" / " great"
   (`ClassificationObjective`'s verbalizers; the template is lower-case because the SST-2 text the model was
   pre-trained on is, and " It" would be three rare tokens). Both options are single tokens in the model's
   BPE (checked), so scoring reads two log-probs at the last position.
3. First-order ceiling: backprop LoRA (AdamW) over transformers+PEFT with the same budget, run before the
   engine starts so that the two never share the CPU.
4. Zero-shot, then each ZO method through the engine (`run_engine_step`), same LoRA init, minibatch order and
   budget; the budget counts training steps only, evaluation pauses the clock. Every evaluation (dev
   accuracy and loss on all 872 sentences) runs through the engine, the first-order result included.

Prints a table and writes curves (`--out-dir`); with --json the last line is a JSON object.

    .venv/bin/python bench/sst2_learning.py --json                                  # the real run
    .venv/bin/python bench/sst2_learning.py --pretrain-steps 10 --budget-s 20       # a smoke run
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.baseline import BaselineConfig, FirstOrderLoraTrainer  # noqa: E402
from scheduler.datasets import load_sst2  # noqa: E402
from scheduler.engine.binding import EngineBinding  # noqa: E402
from scheduler.engine.config import EngineConfig  # noqa: E402
from scheduler.engine_step import run_engine_step  # noqa: E402
from scheduler.models.pretrain import ensure_pretrained_model, load_report  # noqa: E402
from scheduler.objectives import ClassificationObjective, EncodedClassification, LabelledText  # noqa: E402
from scheduler.zo.lora_layout import LoraShape, initial_state, layout_for_model_dir  # noqa: E402
from scheduler.zo.methods import REGISTRY, build_method, hyper_items, parse_hyper  # noqa: E402

JOB_SEED = 17  # every method sees the same minibatch order
THETA_SEED = 5
OBJECTIVE = ClassificationObjective(template="{text} it was")
MAX_LEN = 128

# Per-method hyper-parameters (q = 1 unless --q; ε = 1e-2, MeZO's LoRA setting). The SGD-type methods share
# one lr: LoZO's 1/k weight makes its step the size of MeZO's, and LoZO-M's momentum is an average (1 − β
# dampening). ZO-SGD-MMT's torch-style buffer sums ~1/(1 − β) = 10 estimates, so it takes a tenth. Sign and
# Adam steps are ~lr per coordinate whatever the gradient's scale, so they take their own.
METHOD_PARAMS: dict[str, dict[str, float]] = {
    "mezo-sgd": {"lr": 2e-3},
    "zo-sgd-sign": {"lr": 1e-4},
    "zo-sgd-mmt": {"lr": 2e-4, "momentum": 0.9},
    "zo-adam": {"lr": 1e-3},
    "zo-sgd-cons": {"lr": 2e-3},
    "lozo": {"lr": 2e-3, "rank": 2, "basis_interval": 50},
    "lozo-m": {"lr": 2e-3, "rank": 2, "basis_interval": 50, "momentum": 0.9},
    "kerzoo": {"lr": 2e-3},
    # a ΔW window with LoZO's 1/k weight; rank 2 of the adapter's 8: a 6-column bank from step 150, re-compressed
    # at every window entry from step 200
    "lozo-bank": {"lr": 2e-3, "rank": 2, "basis_interval": 50},
}


@dataclass(frozen=True)
class EvalPoint:
    step: int
    train_s: float
    accuracy: float
    loss: float


@dataclass
class MethodRun:
    method: str
    hyper: dict[str, float]
    num_steps: int = 0
    train_s: float = 0.0
    wall_s: float = 0.0  # training plus evaluation pauses
    step_losses: list[float] = field(default_factory=list)
    evals: list[EvalPoint] = field(default_factory=list)

    @property
    def final(self) -> EvalPoint:
        return self.evals[-1]


def training_examples(num_examples: int, seed: int) -> list[LabelledText]:
    """A class-balanced sample of the train split (the k-shot setting: k = num_examples / 2 per class)."""
    train = load_sst2("train")
    rng = random.Random(f"sst2-kshot:{seed}")
    picked: list[LabelledText] = []
    for label in (0, 1):
        pool = [ex for ex in train if ex.label == label]
        picked += rng.sample(pool, num_examples // 2)
    rng.shuffle(picked)
    return picked


def encode(tokenizer, examples: list[LabelledText]) -> EncodedClassification:
    data = OBJECTIVE.encode(tokenizer, examples, MAX_LEN)
    if not data.single_token_options:
        raise SystemExit(f"options {OBJECTIVE.options} are not single tokens for this tokenizer: {data.option_ids}")
    return data


async def evaluate(binding: EngineBinding, dev: EncodedClassification, slot: int | None, salt: str) -> tuple[float, float]:
    """(accuracy, mean loss) on every dev sentence under the state in `slot` (None: the base model)."""
    indices = list(range(len(dev)))
    scores = await binding.score(dev.sequences(indices), slot, salt=salt)
    result = dev.score_batch(indices, scores)
    return result.num_correct / result.num_examples, result.loss


# ------------------------------------------------------------------------------------ first order
def run_first_order(args, model_dir: str, layout, theta0, train: list[LabelledText], dev_examples) -> tuple[MethodRun, dict]:
    trainer = FirstOrderLoraTrainer(BaselineConfig(model_dir), layout, theta0, lr=args.fo_lr)
    data, dev = encode(trainer.tokenizer, train), encode(trainer.tokenizer, dev_examples)
    run = MethodRun("first-order (backprop, AdamW)", {"lr": args.fo_lr})
    started = time.perf_counter()
    next_eval = 0.0
    while run.train_s < args.budget_s:
        if run.train_s >= next_eval:
            run.evals.append(_fo_eval(trainer, dev, run))
            next_eval += args.budget_s / args.num_evals
        outcome = trainer.step(data, job_seed=JOB_SEED, step=run.num_steps, batch_size=args.batch_size)
        run.step_losses.append(outcome.loss)
        run.num_steps += 1
        run.train_s += outcome.duration_s
    run.evals.append(_fo_eval(trainer, dev, run))
    run.wall_s = time.perf_counter() - started
    return run, trainer.state()


def _fo_eval(trainer: FirstOrderLoraTrainer, dev: EncodedClassification, run: MethodRun) -> EvalPoint:
    """Curve points come from the transformers forward; the table's final figure is re-scored by the engine."""
    correct, losses = 0, []
    for start in range(0, len(dev), 128):
        indices = list(range(start, min(start + 128, len(dev))))
        result = dev.score_batch(indices, trainer.lora.score(dev.sequences(indices)))
        correct += result.num_correct
        losses += [result.loss] * len(indices)
    return EvalPoint(run.num_steps, run.train_s, correct / len(dev), sum(losses) / len(losses))


# ------------------------------------------------------------------------------------ ZO through the engine
async def run_zo_method(args, binding: EngineBinding, name: str, layout, theta0, data, dev) -> MethodRun:
    overrides = {k: float(v) for k, v in (item.split("=") for item in args.lr.split(",") if item)}
    params = {**METHOD_PARAMS[name], **({"lr": overrides[name]} if name in overrides else {})}
    hyper = parse_hyper(name, {"eps": args.eps, "num_directions": args.q, **params})
    method = build_method(name, hyper)
    run = MethodRun(name, dict(hyper_items(hyper)))
    key = f"sst2-{name}"
    probe_slots = binding.slot_ids[: 2 * args.q + 1]
    eval_slot = binding.slot_ids[2 * args.q + 1]
    await binding.set_state(key, layout, theta0, (name, hyper_items(hyper)))
    started = time.perf_counter()
    next_eval = 0.0
    try:
        while run.train_s < args.budget_s:
            if run.train_s >= next_eval:
                run.evals.append(await _engine_eval(binding, key, dev, eval_slot, run))
                next_eval += args.budget_s / args.num_evals
            outcome = await run_engine_step(
                binding, key, data, method, hyper.lr, job_seed=JOB_SEED, step=run.num_steps,
                batch_size=args.batch_size, slots=probe_slots, salt=key,
            )
            run.step_losses.append(outcome.loss)
            run.num_steps += 1
            run.train_s += outcome.duration_s
        run.evals.append(await _engine_eval(binding, key, dev, eval_slot, run))
    finally:
        await binding.drop_state(key)
    run.wall_s = time.perf_counter() - started
    return run


async def _engine_eval(binding: EngineBinding, key: str, dev, slot: int, run: MethodRun) -> EvalPoint:
    await binding.write_state(key, slot)
    accuracy, loss = await evaluate(binding, dev, slot, salt=f"eval:{key}:{run.num_steps}")
    return EvalPoint(run.num_steps, run.train_s, accuracy, loss)


# ------------------------------------------------------------------------------------ report
def _ema(values: list[float], beta: float = 0.98) -> list[float]:
    out, avg = [], None
    for v in values:
        avg = v if avg is None else beta * avg + (1 - beta) * v
        out.append(avg)
    return out


def _run_json(run: MethodRun) -> dict:
    """A run without its per-step losses (thousands of floats): the EMA curve at ≤ 200 points instead."""
    ema = _ema(run.step_losses)
    stride = max(1, len(ema) // 200)
    return {
        "method": run.method,
        "hyper": run.hyper,
        "num_steps": run.num_steps,
        "train_s": run.train_s,
        "wall_s": run.wall_s,
        "steps_per_s": run.num_steps / max(run.train_s, 1e-9),
        "final_accuracy": run.final.accuracy,
        "final_dev_loss": run.final.loss,
        "evals": [asdict(e) for e in run.evals],
        "train_loss_ema": [(i + 1, ema[i]) for i in range(stride - 1, len(ema), stride)],
    }


def plot(runs: list[MethodRun], zero_shot: float, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 5))
    for run in runs:
        seconds = [run.train_s * (i + 1) / max(1, run.num_steps) for i in range(run.num_steps)]
        ax_loss.plot(seconds, _ema(run.step_losses), label=run.method)
        ax_acc.plot([e.train_s for e in run.evals], [100 * e.accuracy for e in run.evals], marker="o", label=run.method)
    ax_acc.axhline(100 * zero_shot, color="grey", linestyle="--", label="zero-shot")
    ax_loss.set(xlabel="training time (s)", ylabel="train loss (EMA 0.98 over steps)", title="training loss")
    ax_acc.set(xlabel="training time (s)", ylabel="dev accuracy (%)", title="SST-2 dev accuracy (872 sentences)")
    ax_acc.legend(fontsize=8)
    fig.tight_layout()
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sst2_curves.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return [path]


def table(runs: list[MethodRun], zero_shot: float, first_order_engine_acc: float | None) -> str:
    lines = [
        "| method | dev accuracy | steps | train time (s) | wall time (s) | steps/s |",
        "|---|---|---|---|---|---|",
        f"| zero-shot (pre-trained LM) | {100 * zero_shot:.1f}% | 0 | 0 | 0 | — |",
    ]
    for run in runs:
        acc = run.final.accuracy
        if first_order_engine_acc is not None and run.method.startswith("first-order"):
            acc = first_order_engine_acc
        lines.append(
            f"| {run.method} | {100 * acc:.1f}% | {run.num_steps} | {run.train_s:.0f} | {run.wall_s:.0f} | "
            f"{run.num_steps / max(run.train_s, 1e-9):.2f} |"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sst2-opt")
    parser.add_argument("--pretrain-steps", type=int, default=None, help="fewer pre-training steps (smoke runs)")
    parser.add_argument("--budget-s", type=float, default=240.0, help="training seconds per method")
    parser.add_argument("--methods", default=",".join(REGISTRY))
    parser.add_argument("--num-train", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--q", type=int, default=1)
    parser.add_argument("--eps", type=float, default=1e-2)
    parser.add_argument("--fo-lr", type=float, default=1e-3)
    parser.add_argument("--lr", default="", help="per-method lr overrides, e.g. mezo-sgd=1e-3,zo-adam=3e-4")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--lora-alpha", type=float, default=16.0)
    parser.add_argument("--lora-targets", default="q_proj,v_proj")
    parser.add_argument("--num-evals", type=int, default=6, help="dev evaluations per method (plus the final one)")
    parser.add_argument("--skip-first-order", action="store_true")
    parser.add_argument("--out-dir", default="results")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    model_dir = str(ensure_pretrained_model(args.model, num_steps=args.pretrain_steps))
    pretrain_report = load_report(Path(model_dir))
    print(f"model {model_dir}: {pretrain_report}", flush=True)
    shape = LoraShape(args.lora_rank, args.lora_alpha, tuple(args.lora_targets.split(",")))
    layout = layout_for_model_dir(model_dir, shape)
    theta0 = initial_state(layout, seed=THETA_SEED)
    train, dev_examples = training_examples(args.num_train, JOB_SEED), load_sst2("dev")

    runs: list[MethodRun] = []
    first_order_theta = None
    if not args.skip_first_order:
        fo_run, first_order_theta = run_first_order(args, model_dir, layout, theta0, train, dev_examples)
        runs.append(fo_run)
        print(f"first-order: {fo_run.num_steps} steps, dev {100 * fo_run.final.accuracy:.1f}% (transformers)", flush=True)

    num_slots = 2 * args.q + 3  # 2q+1 probes (ZO-SGD-Cons), one evaluation slot, one unpinned
    engine_config = EngineConfig(
        model=model_dir, num_slots=num_slots, max_model_len=MAX_LEN + 8, max_lora_rank=max(8, shape.rank),
        target_modules=shape.target_modules,
    )
    binding = await EngineBinding.start(engine_config)
    try:
        data, dev = encode(binding.tokenizer, train), encode(binding.tokenizer, dev_examples)
        zero_shot, _ = await evaluate(binding, dev, None, salt="zero-shot")
        print(f"zero-shot: dev {100 * zero_shot:.1f}%", flush=True)
        first_order_acc = None
        if first_order_theta is not None:
            await binding.set_state("sst2-first-order", layout, first_order_theta)
            await binding.write_state("sst2-first-order", binding.slot_ids[0])
            first_order_acc, _ = await evaluate(binding, dev, binding.slot_ids[0], salt="eval:first-order")
            await binding.drop_state("sst2-first-order")
        for name in args.methods.split(","):
            run = await run_zo_method(args, binding, name, layout, theta0, data, dev)
            runs.append(run)
            print(
                f"{name}: {run.num_steps} steps in {run.train_s:.0f} s ({run.num_steps / run.train_s:.2f}/s), "
                f"dev {100 * run.final.accuracy:.1f}% (loss {run.final.loss:.3f})",
                flush=True,
            )
    finally:
        binding.shutdown()

    print(table(runs, zero_shot, first_order_acc))
    paths = plot(runs, zero_shot, Path(args.out_dir))
    print("curves:", ", ".join(str(p) for p in paths))
    if args.json:
        print(json.dumps({
            "model": args.model,
            "pretrain": asdict(pretrain_report),
            "budget_s": args.budget_s,
            "batch_size": args.batch_size,
            "q": args.q,
            "num_train": args.num_train,
            "zero_shot_accuracy": zero_shot,
            "first_order_engine_accuracy": first_order_acc,
            "lora": asdict(shape),
            "runs": [_run_json(run) for run in runs],
        }))


if __name__ == "__main__":
    asyncio.run(main())
