"""bench/fast_paths.py times both forms of each replaced path at the step shapes it names, and prints JSON."""

from __future__ import annotations

from bench_json import run_bench


def test_the_fast_paths_benchmark_times_both_forms_at_each_step_shape():
    report = run_bench("fast_paths.py", "--calls", "3", timeout_s=300)
    assert report["benchmark"] == "fast_paths" and report["calls"] == 3
    shapes = report["shapes"]
    assert list(shapes) == ["user_prefill", "decode_and_probes", "zo_alone_probe_step"]
    assert "logprob_token_ids_us" not in shapes["user_prefill"]  # a user prefill holds no scoring request
    for row in shapes.values():
        for key in [k for k in row if k.endswith("_us")]:
            assert row[key]["vllm"] > 0 and row[key]["zoserve"] > 0
    assert shapes["zo_alone_probe_step"]["tokens"] > shapes["decode_and_probes"]["tokens"] > shapes["user_prefill"]["tokens"]
