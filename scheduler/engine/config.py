"""Engine settings as a frozen record, translated to vLLM engine arguments in one place."""

from __future__ import annotations

import os
from dataclasses import dataclass

from scheduler.engine.vllm_plugin import BUSY_LOOP_ENV
from scheduler.planning.step_gate import StepGateConfig

# vLLM's scheduler with the per-step probe gate and batched scoring (engine/step_gate_scheduler.py) and the key of
# the gate's settings in vLLM's `additional_config`; named here so that building engine arguments does not
# import vLLM.
STEP_GATE_SCHEDULER_CLS = "scheduler.engine.step_gate_scheduler.make_step_gate_scheduler"
STEP_GATE_CONFIG_KEY = "zoserve_step_gate"
# vLLM's in-process executor: the model runs on the engine core's own thread. Named by class path because
# vLLM's CPU platform turns the short name "uni" into "mp" whenever engine-core multiprocessing is on.
IN_PROCESS_EXECUTOR = "vllm.v1.executor.uniproc_executor.UniProcExecutor"

USER_PRIORITY = 0  # vLLM runs lower values first
PROBE_PRIORITY = 10  # the step gate treats this priority and worse ones as probes


@dataclass(frozen=True)
class EngineConfig:
    model: str  # local model directory
    dtype: str = "float32"  # "float32" | "bfloat16"
    num_slots: int = 8  # vLLM max_loras: num_slots - 1 pinned slots owned by zoserve + 1 for PEFT-dir loads
    max_lora_rank: int = 8
    target_modules: tuple[str, ...] = ("q_proj", "v_proj")
    kv_cache_gib: float = 1.0
    max_model_len: int = 512
    max_num_seqs: int = 256
    max_num_batched_tokens: int = 4096
    enable_prefix_caching: bool = True
    num_cpu_threads: int | None = None  # None: every core of the machine (CPU build only)
    # How long vLLM's shared-memory queue readers (engine core, worker) spin after a read before sleeping on
    # the writer's notification (in 1 ms slices); None keeps vLLM's 1 s. 0: never spin (engine/vllm_plugin.py).
    shm_busy_loop_s: float | None = 0.0
    # How many queued probe tokens each engine step may take next to users (planning/step_gate.py); None:
    # vLLM's scheduler unchanged, probes fill every forward up to max_num_batched_tokens.
    step_gate: StepGateConfig | None = None
    # Probe requests enter the engine one per event-loop turn (scheduler/probe_lane.py), so a burst of them
    # never holds up user work on the service's loop; False submits each as soon as its chunk is admitted.
    probe_lane: bool = True
    # A chunk of scoring sequences goes to the engine core as one utility call and comes back as one reply
    # (engine/score_batches.py) instead of one `AsyncLLM.generate` per sequence; needs zoserve's scheduler,
    # which this turns on even without a step gate. False: one request per sequence, vLLM's scheduler unless
    # a step gate is set.
    batched_scoring: bool = True
    # The model runs in the engine-core process (vLLM's in-process executor) instead of a worker process of
    # its own: one process fewer on the cores and no shared-memory round trips between the two on every
    # step (vLLM makes two a step: the forward, then sampling). False: vLLM's CPU default, a worker process.
    worker_in_engine_core: bool = True
    # vLLM's processes run this much nicer than the process that starts them (the API process), so that the
    # API process gets a core whenever it has work (engine/process_priority.py). 0: the same priority.
    engine_nice_increment: int = 10
    seed: int = 0

    def apply_process_env(self) -> None:
        """Environment the spawned vLLM processes read at start (CPU build); must run before the engine starts."""
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, round(self.kv_cache_gib))))
        num_threads = self.num_cpu_threads or os.cpu_count() or 1
        # By default the CPU worker reserves one core and runs a single OpenMP thread on a 2-core box.
        os.environ.setdefault("VLLM_CPU_NUM_OF_RESERVED_CPU", "0")
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{num_threads - 1}")
        if self.worker_in_engine_core:
            # vLLM sets the worker process's OpenMP threads when it spawns one; in its own process the model
            # would otherwise run one OpenMP thread per core, spinning on the cores the API process needs.
            os.environ["OMP_NUM_THREADS"] = str(num_threads)
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        if self.shm_busy_loop_s is None:
            os.environ.pop(BUSY_LOOP_ENV, None)
        else:
            os.environ[BUSY_LOOP_ENV] = repr(float(self.shm_busy_loop_s))

    def engine_kwargs(self) -> dict:
        return dict(
            model=self.model,
            dtype=self.dtype,
            enable_lora=True,
            max_loras=self.num_slots,
            max_cpu_loras=self.num_slots + 1,
            max_lora_rank=self.max_lora_rank,
            lora_target_modules=list(self.target_modules),
            enforce_eager=True,
            scheduling_policy="priority",
            worker_extension_cls="scheduler.engine.worker_extension.ZOWorkerExtension",
            max_model_len=self.max_model_len,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            enable_prefix_caching=self.enable_prefix_caching,
            disable_log_stats=False,
            seed=self.seed,
            **({"distributed_executor_backend": IN_PROCESS_EXECUTOR} if self.worker_in_engine_core else {}),
            **self._scheduler_kwargs(),
        )

    def _scheduler_kwargs(self) -> dict:
        if self.step_gate is None and not self.batched_scoring:
            return {}
        gate = self.step_gate.to_dict() if self.step_gate is not None else None
        return dict(scheduler_cls=STEP_GATE_SCHEDULER_CLS, additional_config={STEP_GATE_CONFIG_KEY: gate})
