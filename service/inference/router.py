"""Data plane: OpenAI-compatible completions and chat on the base model, adapters and pinned versions.

`model` is the base model's served name, an adapter name (its live version) or `name@version` (that
version, pinned for the request). Every response carries `system_fingerprint = zoserve:<adapter>@<version>`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from service.auth import require_inference
from service.errors import InvalidInput
from service.inference.chat_template import render_chat
from service.inference.generation import Generation, open_generation
from service.inference.schemas import ChatCompletionRequest, CompletionRequest

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(require_inference)])


def _sse(event: dict) -> str:
    return f"data: {json.dumps(event)}\n\n"


def _usage(num_prompt: int, num_completion: int) -> dict:
    return {"prompt_tokens": num_prompt, "completion_tokens": num_completion, "total_tokens": num_prompt + num_completion}


async def _deltas(generation: Generation) -> AsyncIterator[tuple[str, str | None, int, int]]:
    """(text delta, finish reason or None, prompt tokens, completion tokens) per engine chunk."""
    sent = ""
    async for chunk in generation.chunks():
        delta, sent = chunk.text[len(sent) :], chunk.text
        finish = chunk.finish_reason if chunk.finished else None
        if delta or finish is not None:
            yield delta, finish, chunk.num_prompt_tokens, len(chunk.token_ids)


def _head(generation: Generation, kind: str) -> dict:
    return {
        "id": generation.request_id,
        "object": kind,
        "created": generation.created,
        "model": generation.model,
        "system_fingerprint": generation.fingerprint,
    }


@router.get("/models")
async def list_models(request: Request) -> dict:
    runtime = request.app.state.runtime
    base = request.app.state.settings.served_model_name
    created = int(request.app.state.started_at)
    data = [{"id": base, "object": "model", "created": created, "owned_by": "zoserve", "root": base, "parent": None}]
    data += [
        {"id": name, "object": "model", "created": created, "owned_by": "zoserve", "root": name, "parent": base}
        for name in await runtime.served_models()
    ]
    return {"object": "list", "data": data}


@router.post("/completions", response_model=None)
async def create_completion(body: CompletionRequest, request: Request) -> dict | StreamingResponse:
    prompt = body.prompt
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise InvalidInput("prompt: exactly one prompt per request", "prompt")
        prompt = prompt[0]
    generation = await open_generation(request, body, prompt, body.max_tokens, "cmpl")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    if not body.stream:
        text, finish, num_prompt, num_completion = "", None, len(generation.prompt_ids), 0
        async for delta, finish, num_prompt, num_completion in _deltas(generation):
            text += delta
        return {
            **_head(generation, "text_completion"),
            "choices": [{"index": 0, "text": text, "finish_reason": finish, "logprobs": None}],
            "usage": _usage(num_prompt, num_completion),
        }

    async def events() -> AsyncIterator[str]:
        usage = _usage(len(generation.prompt_ids), 0)
        async for delta, finish, num_prompt, num_completion in _deltas(generation):
            usage = _usage(num_prompt, num_completion)
            choice = {"index": 0, "text": delta, "finish_reason": finish, "logprobs": None}
            yield _sse({**_head(generation, "text_completion"), "choices": [choice]})
        if include_usage:
            yield _sse({**_head(generation, "text_completion"), "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")


@router.post("/chat/completions", response_model=None)
async def create_chat_completion(body: ChatCompletionRequest, request: Request) -> dict | StreamingResponse:
    prompt = render_chat(request.app.state.runtime.binding.tokenizer, body.messages)
    generation = await open_generation(request, body, prompt, body.token_limit, "chatcmpl")
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    if not body.stream:
        text, finish, num_prompt, num_completion = "", None, len(generation.prompt_ids), 0
        async for delta, finish, num_prompt, num_completion in _deltas(generation):
            text += delta
        return {
            **_head(generation, "chat.completion"),
            "choices": [
                {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish, "logprobs": None}
            ],
            "usage": _usage(num_prompt, num_completion),
        }

    async def events() -> AsyncIterator[str]:
        head = _head(generation, "chat.completion.chunk")
        yield _sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        usage = _usage(len(generation.prompt_ids), 0)
        async for delta, finish, num_prompt, num_completion in _deltas(generation):
            usage = _usage(num_prompt, num_completion)
            content = {"content": delta} if delta else {}
            yield _sse({**head, "choices": [{"index": 0, "delta": content, "finish_reason": finish, "logprobs": None}]})
        if include_usage:
            yield _sse({**head, "choices": [], "usage": usage})
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
