"""The `openai` Python client, unchanged, against a real uvicorn server: streaming and not, the
model list, errors, and feedback on the answer through the returned id."""

from __future__ import annotations

import uuid

import openai
import pytest

from server_testkit import http, rows


@pytest.fixture
def client(base_url, token) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=f"{base_url}/v1", api_key=token, max_retries=0)


async def test_streaming_completion_is_stored_and_rateable(client, base_url, token, db):
    stream = await client.chat.completions.create(
        model="default",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        stream=True,
        stream_options={"include_usage": True},
        max_tokens=12,
    )
    pieces, ids, finish, usage, model = [], set(), None, None, None
    async for chunk in stream:
        ids.add(chunk.id)
        model = chunk.model
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                pieces.append(choice.delta.content)
            if choice.finish_reason:
                finish = choice.finish_reason
    assert len(ids) == 1, "every chunk carries the answer's id"
    answer_id = ids.pop()
    assert len(pieces) >= 1 and finish in ("stop", "length")
    assert usage is not None and 0 < usage.completion_tokens <= 12

    (stored,) = await rows(db, "SELECT * FROM messages WHERE id = %s", uuid.UUID(answer_id))
    assert stored["content"] == "".join(pieces)
    assert stored["model_version"] == model and stored["finish_reason"] == finish

    async with http(base_url, token) as plain:
        response = await plain.post(f"/api/messages/{answer_id}/feedback", json={"rating": 1})
        assert response.status_code == 200, response.text


async def test_plain_completion_models_and_errors(client, db):
    models = await client.models.list()
    served = [m.id for m in models.data]
    assert served[0] == "default" and len(served) >= 2

    completion = await client.chat.completions.create(
        model=served[1],  # a listed version by name
        messages=[
            {"role": "system", "content": "Answer in one word."},
            {"role": "user", "content": "Say hello"},
        ],
        temperature=0,
        max_tokens=4,
    )
    assert completion.model == served[1]
    assert completion.choices[0].message.role == "assistant"
    assert completion.usage.completion_tokens <= 4
    (stored,) = await rows(db, "SELECT content FROM messages WHERE id = %s", uuid.UUID(completion.id))
    assert stored["content"] == completion.choices[0].message.content

    with pytest.raises(openai.NotFoundError) as missing:
        await client.chat.completions.create(model="gpt-nope", messages=[{"role": "user", "content": "hi"}])
    assert "GET /v1/models" in missing.value.message
    with pytest.raises(openai.UnprocessableEntityError) as too_hot:
        await client.chat.completions.create(
            model="default", messages=[{"role": "user", "content": "hi"}], temperature=5
        )
    assert "MAX_TEMPERATURE" in too_hot.value.message
