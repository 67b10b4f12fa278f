"""User load: streaming completions over real HTTP, open loop (Poisson arrivals) or closed loop, sent from a
separate process (LoadClient).

Time to first token (TTFT) is taken here, at the client, from the scheduled arrival time to the first SSE chunk
that carries text; end-to-end (e2e) to `[DONE]`."""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import time
from dataclasses import dataclass

import httpx

from coserve_parts.monitors import StallMonitor
from coserve_parts.summary import _pct

USER_ADAPTERS = ("users-a", "users-b", "users-c")


@dataclass(frozen=True)
class UserSample:
    phase: str
    scheduled_s: float  # wall time the request was due (open loop) or sent (closed loop)
    sent_s: float
    first_text_s: float | None
    done_s: float
    num_prompt_tokens: int
    num_output_tokens: int
    error: str | None
    completion_id: str | None = None  # the SSE chunks' `id`: joins the sample to the service's TTFT stages

    @property
    def send_lag_s(self) -> float:
        return self.sent_s - self.scheduled_s

    @property
    def ttft_s(self) -> float | None:
        return None if self.first_text_s is None else self.first_text_s - self.scheduled_s

    @property
    def e2e_s(self) -> float:
        return self.done_s - self.scheduled_s


class _Stream:
    """One streamed completion's SSE lines as the client reads them: first text, usage, the completion id."""

    def __init__(self) -> None:
        self.first: float | None = None
        self.usage: dict | None = None
        self.completion_id: str | None = None

    def line(self, line: str) -> bool:
        """Take one line; False once the stream is done."""
        if not line.startswith("data: "):
            return True
        if line == "data: [DONE]":
            return False
        event = json.loads(line[len("data: "):])
        self.completion_id = self.completion_id or event.get("id")
        if event.get("usage"):
            self.usage = event["usage"]
        if self.first is None and any(choice.get("text") for choice in event.get("choices", ())):
            self.first = time.time()
        return True

    def sample(self, phase: str, scheduled_s: float, sent_s: float, error: str | None) -> UserSample:
        if error is None and self.usage is None:
            error = "no usage chunk"
        usage = self.usage or {}
        return UserSample(
            phase, scheduled_s, sent_s, self.first, time.time(), usage.get("prompt_tokens", 0),
            usage.get("completion_tokens", 0), error, self.completion_id,
        )


def _body(model: str, prompt: str, max_tokens: int) -> dict:
    return {
        "model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 1.0, "stream": True,
        "stream_options": {"include_usage": True},
    }


async def one_request(client: httpx.AsyncClient, phase: str, model: str, prompt: str, max_tokens: int, scheduled_s: float) -> UserSample:
    stream, error = _Stream(), None
    sent = time.time()
    try:
        async with client.stream("POST", "/v1/completions", json=_body(model, prompt, max_tokens)) as reply:
            if reply.status_code != 200:
                error = f"HTTP {reply.status_code}: {(await reply.aread())[:300]!r}"
            else:
                async for line in reply.aiter_lines():
                    if not stream.line(line):
                        break
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return stream.sample(phase, scheduled_s, sent, error)


async def one_request_aiohttp(session, phase: str, model: str, prompt: str, max_tokens: int, scheduled_s: float) -> UserSample:
    """`one_request` over aiohttp (its HTTP parser is C; httpx's h11 is Python): the load generator's own
    per-chunk cost, which it pays in bursts after every engine step, is smaller."""
    import aiohttp

    stream, error = _Stream(), None
    sent = time.time()
    try:
        async with session.post("/v1/completions", json=_body(model, prompt, max_tokens)) as reply:
            if reply.status != 200:
                error = f"HTTP {reply.status}: {(await reply.read())[:300]!r}"
            else:
                async for raw in reply.content:
                    if not stream.line(raw.decode().rstrip("\r\n")):
                        break
    except (aiohttp.ClientError, json.JSONDecodeError) as exc:
        error = f"{type(exc).__name__}: {exc}"
    return stream.sample(phase, scheduled_s, sent, error)


REQUESTERS = {"httpx": one_request, "aiohttp": one_request_aiohttp}


def poisson_offsets(rate_per_s: float, duration_s: float, seed: int) -> list[float]:
    rng = random.Random(seed)
    offsets, t = [], 0.0
    while (t := t + rng.expovariate(rate_per_s)) < duration_s:
        offsets.append(t)
    return offsets


async def open_loop(client, phase: str, prompts: list[str], offsets: list[float], args) -> tuple[float, list[UserSample], dict]:
    """Send a request at each offset from now, whatever is still in flight; all samples once every one ends.

    The load generator's own garbage collector is off during the phase (a full collection of its heap stalled
    sends and reads for hundreds of ms, which the measurement charged to the server), and its event-loop lags
    are returned with the samples (the same monitor as the service's)."""
    gc.collect()
    gc.disable()
    monitor = StallMonitor()
    stop = asyncio.Event()
    watching = asyncio.create_task(monitor.run(stop))
    try:
        start, samples = await _send_open_loop(client, phase, prompts, offsets, args)
    finally:
        stop.set()
        await watching
        gc.enable()
    return start, samples, monitor.view()


async def _send_open_loop(client, phase: str, prompts: list[str], offsets: list[float], args) -> tuple[float, list[UserSample]]:
    start = time.time()
    tasks = []
    for i, offset in enumerate(offsets):
        delay = start + offset - time.time()
        if delay > 0:
            await asyncio.sleep(delay)
        model = USER_ADAPTERS[i % len(USER_ADAPTERS)]
        tasks.append(asyncio.create_task(
            REQUESTERS[args.client](client, phase, model, prompts[i % len(prompts)], args.output_tokens, start + offset)
        ))
    return start, list(await asyncio.gather(*tasks))


def _http_client(url: str, kind: str):
    if kind == "aiohttp":
        import aiohttp

        connector = aiohttp.TCPConnector(limit=4096, limit_per_host=4096)
        return aiohttp.ClientSession(base_url=url, connector=connector, timeout=aiohttp.ClientTimeout(total=120))
    limits = httpx.Limits(max_connections=4096, max_keepalive_connections=256)
    return httpx.AsyncClient(base_url=url, timeout=120, limits=limits)


def _client_main(url: str, kind: str, payload: dict):
    """Entry point of the load-generator process: its own interpreter and event loop, like a real client."""

    async def go():
        ns = argparse.Namespace(**payload["args"])
        async with _http_client(url, ns.client) as client:
            if kind == "open":
                return await open_loop(client, payload["phase"], payload["prompts"], payload["offsets"], ns)
            return await closed_loop(
                client, payload["prompts"], payload["concurrency"], payload["warmup_s"], payload["measure_s"], ns
            )

    return asyncio.run(go())


class LoadClient:
    """User load from a separate process. In-process, every stall of the service's event loop (engine output
    processing, step loops, commits) also stalled the load generator's clock and sends (send lag p99 120 ms),
    so the measurement mixed the two; real users are not inside the server."""

    def __init__(self, url: str, args) -> None:
        import concurrent.futures
        import multiprocessing

        self._url = url
        self._args = {"output_tokens": args.output_tokens, "client": args.load_client}
        self._pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))

    async def _call(self, kind: str, payload: dict):
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, _client_main, self._url, kind, {**payload, "args": self._args})

    async def open_loop(self, phase: str, prompts: list[str], offsets: list[float]) -> tuple[float, list[UserSample], dict]:
        return await self._call("open", {"phase": phase, "prompts": prompts, "offsets": offsets})

    async def closed_loop(self, prompts: list[str], concurrency: int, warmup_s: float, measure_s: float) -> dict:
        payload = {"prompts": prompts, "concurrency": concurrency, "warmup_s": warmup_s, "measure_s": measure_s}
        return await self._call("closed", payload)

    def close(self) -> None:
        self._pool.shutdown()


async def closed_loop(client, prompts: list[str], concurrency: int, warmup_s: float, measure_s: float, args) -> dict:
    start = time.time()
    stop_at = start + warmup_s + measure_s
    samples: list[UserSample] = []

    async def worker(index: int) -> None:
        i = index
        while time.time() < stop_at:
            model = USER_ADAPTERS[i % len(USER_ADAPTERS)]
            samples.append(await REQUESTERS[args.client](
                client, "calibrate", model, prompts[i % len(prompts)], args.output_tokens, time.time()
            ))
            i += concurrency

    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    window = [s for s in samples if start + warmup_s <= s.done_s <= stop_at and s.error is None]
    return {
        "concurrency": concurrency,
        "measure_s": measure_s,
        "num_completed": len(window),
        "num_errors": sum(1 for s in samples if s.error is not None),
        "completions_per_s": len(window) / measure_s,
        "output_tokens_per_s": sum(s.num_output_tokens for s in window) / measure_s,
        "ttft_p50_ms": _pct([s.ttft_s for s in window], 50),
        "e2e_p50_ms": _pct([s.e2e_s for s in window], 50),
    }
