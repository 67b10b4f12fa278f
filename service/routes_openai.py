"""Data plane: OpenAI-compatible completions on the base model and on adapters that keep adapting."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from scheduler.engine.binding import GenerationChunk
from scheduler.runtime import Runtime
from service.errors import error_body
from service.schemas import CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"])


def _runtime(request: Request) -> Runtime:
    return request.app.state.runtime


@router.get("/models")
async def list_models(request: Request) -> dict:
    runtime = _runtime(request)
    base = request.app.state.settings.served_model_name
    created = int(request.app.state.started_at)
    data = [{"id": base, "object": "model", "created": created, "owned_by": "zoserve", "root": base, "parent": None}]
    data += [
        {"id": name, "object": "model", "created": created, "owned_by": "zoserve", "root": name, "parent": base}
        for name in runtime.served_adapters()
    ]
    return {"object": "list", "data": data}


@router.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> JSONResponse | StreamingResponse:
    runtime = _runtime(request)
    settings = request.app.state.settings
    if body.model != settings.served_model_name and body.model not in runtime.served_adapters():
        return JSONResponse(
            error_body(f"model {body.model!r} does not exist", "NotFoundError", "model", 404), status_code=404
        )
    prompt_ids = runtime.binding.tokenizer(body.prompt).input_ids
    limit = runtime.binding.config.max_model_len
    if len(prompt_ids) + body.max_tokens > limit:
        message = f"prompt ({len(prompt_ids)} tokens) + max_tokens ({body.max_tokens}) exceeds the context length {limit}"
        return JSONResponse(error_body(message, "invalid_request_error", "max_tokens", 400), status_code=400)
    completion_id = f"cmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    stop = [body.stop] if isinstance(body.stop, str) else body.stop

    async def chunks(stack: AsyncExitStack) -> AsyncIterator[tuple[GenerationChunk, str]]:
        """Generation chunks with the fingerprint of the one adapter version that produced all of them."""
        async with stack:
            slot, salt, fingerprint = None, "base", f"zoserve:{body.model}"
            if body.model != settings.served_model_name:
                lease = await stack.enter_async_context(runtime.lease(body.model))
                slot, salt = lease.slot, lease.cache_salt
                fingerprint = f"zoserve:{lease.adapter}@{lease.version}"
            async for chunk in runtime.binding.generate(
                prompt_ids,
                max_tokens=body.max_tokens,
                temperature=body.temperature,
                top_p=body.top_p,
                seed=body.seed,
                stop=stop,
                slot=slot,
                salt=salt,
                request_id=completion_id,
            ):
                yield chunk, fingerprint

    if not body.stream:
        final, fingerprint = None, ""
        async for final, fingerprint in chunks(AsyncExitStack()):
            pass
        return JSONResponse(
            {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": fingerprint,
                "choices": [{"index": 0, "text": final.text, "finish_reason": final.finish_reason, "logprobs": None}],
                "usage": {
                    "prompt_tokens": final.num_prompt_tokens,
                    "completion_tokens": len(final.token_ids),
                    "total_tokens": final.num_prompt_tokens + len(final.token_ids),
                },
            }
        )

    async def sse() -> AsyncIterator[str]:
        sent = ""
        async for chunk, fingerprint in chunks(AsyncExitStack()):
            delta, sent = chunk.text[len(sent) :], chunk.text
            event = {
                "id": completion_id,
                "object": "text_completion",
                "created": created,
                "model": body.model,
                "system_fingerprint": fingerprint,
                "choices": [
                    {"index": 0, "text": delta, "finish_reason": chunk.finish_reason if chunk.finished else None, "logprobs": None}
                ],
            }
            yield f"data: {json.dumps(event)}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(sse(), media_type="text/event-stream")
