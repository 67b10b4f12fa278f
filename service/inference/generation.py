"""One user generation: resolve the model, hold its adapter version, stream chunks, record latency.

The adapter lease is taken *before* the response starts, so an unknown model is a clean 404, and it is held
until the last token, so the request sees one adapter version throughout (the fingerprint names it).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from dataclasses import dataclass, field

from fastapi import Request

from adapters_store import errors as store
from scheduler import errors as sched
from scheduler.engine.binding import EngineTimes, GenerationChunk
from scheduler.runtime import Runtime
from service.errors import NotFound, ServiceError
from service.inference.schemas import _Sampling
from service.metrics import ZoMetrics
from service.telemetry import received_at


class ContextTooLong(ServiceError):
    status_code = 400


@dataclass
class Generation:
    request_id: str
    model: str
    fingerprint: str
    adapter_class: str
    prompt_ids: list[int]
    created: int
    _stack: AsyncExitStack
    _runtime: Runtime
    _metrics: ZoMetrics
    _inflight: list[int]
    _body: _Sampling
    _max_tokens: int
    _started: float = field(default_factory=time.perf_counter)
    _request_in_s: float = 0.0  # the HTTP middleware's first sight of the request -> _started
    _slot: int | None = None  # None: the base model
    _salt: str = "base"

    async def chunks(self) -> AsyncIterator[GenerationChunk]:
        """Engine chunks (cumulative text); closes the lease and records metrics when done or dropped."""
        ttft_s, final = None, None
        entered_s, handler_s = time.monotonic(), time.perf_counter() - self._started
        self._inflight[0] += 1
        lane = self._runtime.binding.probe_lane
        hold = lane.hold() if lane is not None else None  # probe submissions pause until our first token
        try:
            # The co-scheduler sizes the ZO budget from these requests' time to first token.
            async with self._stack, self._runtime.user_request(len(self.prompt_ids)) as tracked:
                async for chunk in self._runtime.binding.generate(
                    self.prompt_ids,
                    max_tokens=self._max_tokens,
                    temperature=self._body.temperature,
                    top_p=self._body.top_p,
                    seed=self._body.seed,
                    stop=self._body.stop_list,
                    slot=self._slot,
                    salt=self._salt,
                    request_id=self.request_id,
                ):
                    if ttft_s is None and chunk.token_ids:
                        ttft_s = time.perf_counter() - self._started
                        tracked.first_token()
                        self._observe_stages(handler_s, entered_s, chunk.engine_times)
                    tracked.num_output_tokens = len(chunk.token_ids)
                    final = chunk
                    yield chunk
                    if hold is not None and ttft_s is not None:
                        hold.release()  # the first token is written out
        finally:
            if hold is not None:
                hold.release()
            self._inflight[0] -= 1
            self._metrics.observe_user_request(
                self.adapter_class, duration_s=time.perf_counter() - self._started, ttft_s=ttft_s  # type: ignore[arg-type]
            )
            if final is not None:
                self._metrics.count_tokens("serve", final.num_prompt_tokens + len(final.token_ids))

    def _observe_stages(self, handler_s: float, entered_s: float, times: EngineTimes | None) -> None:
        if times is None:
            return
        self._metrics.observe_ttft_stages({
            "request_in": self._request_in_s,
            "handler": handler_s,
            "to_engine": times.queued_s - entered_s,
            "engine_wait": times.scheduled_s - times.queued_s,
            "first_forward": times.first_token_s - times.scheduled_s,
            "to_service": time.monotonic() - times.first_token_s,
        }, request_id=self.request_id)


async def open_generation(request: Request, body: _Sampling, prompt: str, max_tokens: int, prefix: str) -> Generation:
    started = time.perf_counter()
    state = request.app.state
    runtime: Runtime = state.runtime
    base = state.settings.served_model_name
    prompt_ids = list(runtime.binding.tokenizer(prompt).input_ids)
    limit = runtime.binding.config.max_model_len
    if len(prompt_ids) + max_tokens > limit:
        raise ContextTooLong(
            f"prompt ({len(prompt_ids)} tokens) + max_tokens ({max_tokens}) exceeds the context length {limit}",
            "max_tokens",
        )
    stack = AsyncExitStack()
    generation = Generation(
        request_id=f"{prefix}-{uuid.uuid4().hex}",
        model=body.model,
        fingerprint=f"zoserve:{base}",
        adapter_class="base",
        prompt_ids=prompt_ids,
        created=int(time.time()),
        _stack=stack,
        _runtime=runtime,
        _metrics=state.metrics,
        _inflight=state.inflight_generations,
        _body=body,
        _max_tokens=max_tokens,
        _started=started,
        _request_in_s=started - (received_at(request.scope) or started),
    )
    if body.model != base:
        try:
            lease = await stack.enter_async_context(runtime.lease(body.model))
        except (sched.AdapterNotServed, store.AdapterNotFound, store.VersionNotFound, store.InvalidArgument) as exc:
            raise NotFound(f"model {body.model!r} does not exist ({exc})", "model") from None
        generation._slot, generation._salt = lease.slot, lease.cache_salt
        generation.fingerprint = f"zoserve:{lease.adapter}@{lease.version}"
        generation.adapter_class = "pinned_version" if "@" in body.model else "adapter"
    return generation
