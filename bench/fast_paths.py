"""Per-call cost of vLLM's per-step paths that zoserve replaces on CPU, against zoserve's vectorised form.

scheduler/engine/cpu_fast_paths.py replaces vLLM's LoRA mapping conversion (`convert_mapping`, run every
step whose token -> adapter mapping changed) and its gather of chosen-token log-probs
(`Sampler.gather_specific_token_logprobs`, run every step that holds a scoring request). This times both
forms at the shapes the co-serving benchmark's steps have (a user prefill, a decode + probe step, a ZO-alone
probe step), in this process, one thread, the two forms interleaved call by call so that the machine's drift
reaches both alike. Median µs per call.

    .venv/bin/python bench/fast_paths.py --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from scheduler.engine import cpu_fast_paths  # noqa: E402

# (name, tokens in the step, requests in the step, of which scoring requests): the benchmark's step shapes
SHAPES = (
    ("user_prefill", 54, 6, 0),
    ("decode_and_probes", 180, 14, 8),
    ("zo_alone_probe_step", 900, 44, 44),
)
VOCAB = 2048
SLOT_IDS = (3, 5, 7, 9, 11, 13, 2)  # adapter ids in 7 of 16 slots


def _timed_pair(first, second, calls: int) -> tuple[float, float]:
    """Median µs of each of two functions, called alternately."""
    a, b = [], []
    for _ in range(10):
        first(), second()
    for _ in range(calls):
        t0 = time.perf_counter()
        first()
        t1 = time.perf_counter()
        second()
        t2 = time.perf_counter()
        a.append(t1 - t0)
        b.append(t2 - t1)
    return 1e6 * statistics.median(a), 1e6 * statistics.median(b)


def run(calls: int, seed: int) -> dict:
    from vllm.lora.layers.utils import LoRAMapping
    from vllm.v1.sample.sampler import Sampler

    vllm_mapping, vllm_gather = cpu_fast_paths.vllm_originals()
    rng = np.random.default_rng(seed)
    slots = [*SLOT_IDS, *[None] * (16 - len(SLOT_IDS))]
    sampler = Sampler()
    result: dict = {"benchmark": "fast_paths", "calls": calls, "shapes": {}}
    for name, num_tokens, num_requests, num_scoring in SHAPES:
        requests = rng.choice(SLOT_IDS, size=num_requests).astype(np.int32)
        lengths = np.full(num_requests, max(1, num_tokens // num_requests))
        mapping = LoRAMapping(np.repeat(requests, lengths), requests, is_prefill=True)
        row = {"tokens": int(lengths.sum()), "requests": num_requests, "scoring_requests": num_scoring}
        vllm_us, ours_us = _timed_pair(
            lambda: vllm_mapping(mapping, slots, 17, VOCAB, "cpu"),
            lambda: cpu_fast_paths.convert_mapping(mapping, slots, 17, VOCAB, "cpu"),
            calls,
        )
        row["lora_mapping_us"] = {"vllm": vllm_us, "zoserve": ours_us}
        if num_scoring:
            logprobs = torch.randn(num_requests, VOCAB).log_softmax(-1)
            sampled = torch.randint(0, VOCAB, (num_requests,))
            wanted = {row_index: [7, 9] for row_index in range(num_requests - num_scoring, num_requests)}
            vllm_us, ours_us = _timed_pair(
                lambda: vllm_gather(sampler, logprobs, wanted, sampled),
                lambda: cpu_fast_paths.gather_specific_token_logprobs(sampler, logprobs, wanted, sampled),
                calls,
            )
            row["logprob_token_ids_us"] = {"vllm": vllm_us, "zoserve": ours_us}
        result["shapes"][name] = row
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--calls", type=int, default=400)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    torch.set_num_threads(1)
    result = run(args.calls, args.seed)
    for name, row in result["shapes"].items():
        parts = [f"{key[:-3]} vLLM {v['vllm']:.0f} / zoserve {v['zoserve']:.0f} µs" for key, v in row.items() if key.endswith("_us")]
        print(f"{name:20s} {row['tokens']:4d} tokens, {row['requests']:2d} requests: " + "; ".join(parts))
    if args.json:
        print(json.dumps(result))


if __name__ == "__main__":
    main()
