"""Service settings (environment prefix ZOSERVE_), built in the app factory: no import-time singleton."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


def _string_list(value: object) -> object:
    """Lists from the environment: a JSON list (`'["k1","k2"]'`) or comma-separated (`k1,k2`)."""
    if not isinstance(value, str):
        return value
    text = value.strip()
    if text.startswith("["):
        return json.loads(text)
    return [item.strip() for item in text.split(",") if item.strip()]


StringList = Annotated[list[str], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="ZOSERVE_", env_file=None)

    host: str = "127.0.0.1"
    port: int = 8000
    # A local model directory; empty means the tiny model below, built locally on first run and cached.
    model: str = ""
    tiny_model: str = "tiny-opt"
    served_model_name: str = "base"
    dtype: str = "float32"
    num_slots: int = Field(8, ge=2, le=64)
    max_lora_rank: int = Field(8, ge=1, le=256)
    target_modules: StringList = ["q_proj", "v_proj"]
    kv_cache_gib: float = 1.0
    max_model_len: int = 512
    max_num_batched_tokens: int = Field(4096, ge=64)
    # The user time-to-first-token p95 the co-scheduler keeps ZO work under.
    coscheduler_target_ttft_ms: float = Field(500.0, gt=0)
    coscheduler_max_tokens_in_flight: int = Field(8192, ge=1)
    coscheduler_chunk_tokens: int = Field(128, ge=1)  # probe tokens per chunk: a user waits behind ~one
    # The budget's floor in chunks: the admitted probes kept queued for the per-step gate to draw from next to
    # users (0: ZO may stop while users' latency is over target, and resumes only when it recovers or users
    # leave). The engine's per-step gate decides how many probe tokens each forward next to users takes; this
    # floor keeps enough admitted probes queued that those forwards are full. At 2 chunks the budget, not the
    # gate, limited ZO next to users: bench/coserve.py, 40 s phases, together-phase TTFT p99 37.3 vs 37.5 ms,
    # ZO 5.7 vs 11.1 steps/s at 2 and 16 chunks (results/coserve.md, session 5).
    coscheduler_min_chunks_in_flight: int = Field(16, ge=0)
    coscheduler_fairness_max_lead_tokens: float = Field(0.0, ge=0)
    coscheduler_hold_chunks_while_users_wait: bool = True
    # With a value, the latency controller lowers the step gate's per-step probe cap (below) to no less than this
    # many tokens while users' TTFT p95 is over the target (scheduler/probe_cap_control.py); None (default)
    # keeps the static cap.
    coscheduler_min_probe_tokens_per_step: int | None = Field(None, ge=0)
    freeze_gc_heap: bool = True  # gc.freeze() once started (as vLLM's server does): shorter full collections
    # Generation-1 collections before a full one in this process (Python's own: 10); None keeps Python's.
    # Fewer full collections, fewer stops of the event loop users share with the step loops (service/heap.py).
    gc_full_collection_threshold: int | None = Field(1000, ge=1)
    # The CPU engine's OpenMP threads. None: every core but one, which stays with this process (HTTP, vLLM's
    # input/output processing, the step loops); on 2 cores that doubled user capacity and halved TTFT.
    cpu_threads: int | None = Field(None, ge=1)
    # Seconds vLLM's engine-core and worker processes spin on their shared-memory queue after each read
    # (vLLM's own default is 1 s; None keeps it). 0 never spins: they sleep on the queue in 1 ms slices; the
    # engine core otherwise spins through every forward, on a core the API server needs.
    shm_busy_loop_s: float | None = Field(0.0, ge=0)
    # Probe tokens one engine step may take while users are present (vLLM's scheduler holds the rest back
    # for a later step; planning/step_gate.py). None: no per-step gate, probes fill each forward up to
    # max_num_batched_tokens. The prefill figure applies to steps that carry a user's first forward.
    # 192 against 256 inside single co-serving runs (bench/coserve.py --ab-gate-tokens): users' TTFT p99 next
    # to ZO -9 % and -7 %, ZO steps -4 % and -0 % (results/coserve.md, session 17).
    step_gate_tokens_with_users: int | None = Field(192, ge=0)
    step_gate_tokens_with_user_prefill: int = Field(0, ge=0)
    step_gate_user_memory_s: float = Field(2.0, ge=0)
    # Probe requests enter the engine one per event-loop turn, so user HTTP and streaming work on the one
    # loop never waits behind a burst of probe submissions (scheduler/probe_lane.py). False: all at once.
    probe_lane: bool = True
    # A job scores its next step while the last one is committed (scheduler/job_runner.py); False: each step's
    # commit ends before the next step's probes go in (sessions 1-18; kept for in-run A/Bs).
    pipelined_commits: bool = True
    # A chunk of probe sequences goes to vLLM's engine core as one call and returns as one reply
    # (scheduler/engine/score_batches.py); False sends one vLLM request per sequence through AsyncLLM.
    batched_scoring: bool = True
    # The model runs in vLLM's engine-core process instead of a worker process of its own (no per-step
    # round trips between the two; scheduler/engine/config.py). False: vLLM's CPU default.
    worker_in_engine_core: bool = True
    # vLLM's processes run this much nicer than this one, so the API process (HTTP, tokenising, streaming)
    # gets a core whenever it has work and the engine computes in what it leaves (engine/process_priority.py).
    # 0: equal priority. Measured (bench/coserve.py, 2 cores): the API loop's lags with ZO running halved.
    engine_nice_increment: int = Field(10, ge=0, le=19)
    data_dir: Path = Path(".zoserve")
    redis_url: str | None = None
    # Full adapter snapshot every N committed versions (replay covers the ones between).
    snapshot_every: int = Field(50, ge=1)

    # --- auth: a key in admin_api_keys opens the control plane, one in inference_api_keys the data plane.
    # With both empty the service is open (and says so at start-up).
    admin_api_keys: StringList = []
    inference_api_keys: StringList = []
    # Probes and scrapers usually carry no key; set these false to require the admin key there too.
    open_health: bool = True
    open_metrics: bool = True

    # --- limits
    max_upload_bytes: int = Field(32 * 1024 * 1024, ge=1)
    max_inline_examples: int = Field(100_000, ge=1)
    # How often the runtime's state (jobs, slots, queues) is copied into the Prometheus gauges.
    metrics_refresh_s: float = Field(1.0, gt=0)

    @field_validator("admin_api_keys", "inference_api_keys", "target_modules", mode="before")
    @classmethod
    def _split(cls, value: object) -> object:
        return _string_list(value)

    @property
    def is_open(self) -> bool:
        return not self.admin_api_keys and not self.inference_api_keys

    @property
    def files_dir(self) -> Path:
        return Path(self.data_dir) / "files"

    @property
    def store_dir(self) -> Path:
        return Path(self.data_dir) / "store"

    @property
    def exports_dir(self) -> Path:
        return Path(self.data_dir) / "exports"
