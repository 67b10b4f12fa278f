"""The official `openai` Python client drives the data plane unchanged: completions and chat, streaming and
not, on the base model, an adapter (its latest version) and `name@version` (a pinned version)."""

from __future__ import annotations

import openai
import pytest

from service_harness import ADMIN_KEY, INFERENCE_KEY, job_body, wait_for_job


@pytest.fixture(scope="module")
async def trained(service_url) -> str:
    """An adapter with a few committed versions."""
    from service_harness import client_for

    async with client_for(service_url, ADMIN_KEY) as admin:
        job = (await admin.post("/v1/jobs", json=job_body("oai-sst2", 4))).json()
        await wait_for_job(admin, job["id"], lambda j: j["status"] == "succeeded")
    return "oai-sst2"


@pytest.fixture
async def oai(service_url):
    async with openai.AsyncOpenAI(base_url=f"{service_url}/v1", api_key=INFERENCE_KEY, max_retries=0) as client:
        yield client


@pytest.mark.parametrize("model,fingerprint", [
    ("base", "zoserve:base"),
    ("oai-sst2", "zoserve:oai-sst2@4"),
    ("oai-sst2@2", "zoserve:oai-sst2@2"),
])
async def test_completions_and_chat_streaming_and_not(oai, trained, model, fingerprint):
    completion = await oai.completions.create(model=model, prompt="the movie was", max_tokens=5, temperature=0)
    assert completion.model == model and completion.system_fingerprint == fingerprint
    assert completion.choices[0].finish_reason in ("length", "stop")
    assert 1 <= completion.usage.completion_tokens <= 5

    pieces, finish = [], None
    stream = await oai.completions.create(model=model, prompt="the movie was", max_tokens=5, temperature=0, stream=True)
    async for chunk in stream:
        assert chunk.system_fingerprint == fingerprint
        pieces.append(chunk.choices[0].text)
        finish = chunk.choices[0].finish_reason or finish
    assert "".join(pieces) == completion.choices[0].text, "greedy streaming and non-streaming agree"
    assert finish in ("length", "stop")

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "How was the movie?"}]
    chat = await oai.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0)
    assert chat.object == "chat.completion" and chat.system_fingerprint == fingerprint
    assert chat.choices[0].message.role == "assistant" and isinstance(chat.choices[0].message.content, str)

    deltas, roles, usage = [], [], None
    stream = await oai.chat.completions.create(
        model=model, messages=messages, max_tokens=5, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    async for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            roles += [choice.delta.role] if choice.delta.role else []
            deltas.append(choice.delta.content or "")
    assert roles == ["assistant"]
    assert "".join(deltas) == chat.choices[0].message.content
    assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens


async def test_models_and_errors_through_the_client(oai, trained, service_url):
    ids = [m.id async for m in oai.models.list()]
    assert ids[0] == "base" and "oai-sst2" in ids
    with pytest.raises(openai.NotFoundError):
        await oai.completions.create(model="no-such-adapter", prompt="x", max_tokens=1)
    with pytest.raises(openai.NotFoundError):
        await oai.chat.completions.create(model="oai-sst2@77", messages=[{"role": "user", "content": "x"}], max_tokens=1)
    with pytest.raises(openai.UnprocessableEntityError):
        await oai.completions.create(model="base", prompt="x", max_tokens=1, temperature=5)
    async with openai.AsyncOpenAI(base_url=f"{service_url}/v1", api_key="nope", max_retries=0) as stranger:
        with pytest.raises(openai.AuthenticationError):
            await stranger.models.list()
    async with openai.AsyncOpenAI(base_url=f"{service_url}/v1", api_key=ADMIN_KEY, max_retries=0) as admin:
        with pytest.raises(openai.PermissionDeniedError):
            await admin.completions.create(model="base", prompt="x", max_tokens=1)
