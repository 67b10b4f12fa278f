"""Each streamed user request reports where its time to first token went, under the completion's own id."""

from __future__ import annotations

import openai

from service.metrics import TTFT_STAGES
from service_harness import INFERENCE_KEY, running_app, service_settings


async def test_stages_are_reported_once_per_request_under_the_sse_id(engine, tmp_path):
    async with running_app(service_settings(tmp_path), engine) as (app, url):
        seen: list[tuple[dict, str | None]] = []
        observe = app.state.metrics.observe_ttft_stages

        def recording(stages_s, request_id=None):
            seen.append((dict(stages_s), request_id))
            observe(stages_s, request_id=request_id)

        app.state.metrics.observe_ttft_stages = recording
        async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=INFERENCE_KEY, max_retries=0) as oai:
            ids = []
            for prompt in ("the movie was", "a dull film"):
                stream = await oai.completions.create(model="base", prompt=prompt, max_tokens=4, temperature=0, stream=True)
                ids.append({chunk.id async for chunk in stream})
    assert all(len(chunk_ids) == 1 for chunk_ids in ids), "every chunk of one stream carries the same id"
    assert [request_id for _, request_id in seen] == [chunk_ids.pop() for chunk_ids in ids]
    for stages, _ in seen:
        assert tuple(stages) == TTFT_STAGES
        assert all(seconds >= -1e-3 for seconds in stages.values())
        assert 0.0 < sum(stages.values()) < 30.0
        assert stages["request_in"] > 0.0, "measured from the HTTP middleware's stamp, not from the handler"
