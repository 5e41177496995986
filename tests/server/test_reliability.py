"""Reliability and security, against a real server, the tiny model and PostgreSQL: nothing one
request carries can fail another's (poisoned sampling parameters with bystanders streaming),
text PostgreSQL or the tokenizer cannot hold is refused on every path before any SQL, deep
JSON is bad JSON, numbers and booleans are strict, a user's websocket connections are capped,
the OpenAI API always answers in OpenAI's error shape, and user B can reach none of user A's
conversations or messages through any endpoint or frame type.

Hypothesis and schemathesis fuzzing lives in test_fuzz.py.
"""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx
import pytest
import websockets

from server_testkit import connect, http, make_settings, new_token, rows, serve, user_row_counts

NOTHING = {"conversations": 0, "messages": 0, "ratings": 0, "comparisons": 0}


async def send_json(client: httpx.AsyncClient, method: str, path: str, body) -> httpx.Response:
    """A JSON body with non-ASCII escaped, as JSON allows: a lone surrogate travels as \\ud800
    (httpx's own json= writes UTF-8, which cannot hold one)."""
    return await client.request(method, path, content=json.dumps(body).encode(),
                                headers={"Content-Type": "application/json"})


# -- isolation: poisoned sampling parameters ---------------------------------------------------

# Each passed validation before and underflowed in float32 inside the batch's sampler.
POISONS = [
    {"temperature": 1e-300},
    {"top_p": 1e-300},
    {"temperature": 5e-324},
    {"temperature": 1e-40, "top_p": 1e-40},
]


async def test_poisoned_params_do_not_fail_bystanders(base_url, db):
    """Three users stream while a fourth sends every poisoned parameter set: every answer, the
    poisoned ones included, ends normally; a tiny temperature or top_p decodes greedily (and is
    stored as temperature 0, what was used)."""

    async with connect(base_url, new_token()) as a, connect(base_url, new_token()) as b, \
            connect(base_url, new_token()) as c, connect(base_url, new_token()) as attacker:
        streams = []
        for ws in (a, b, c):
            await ws.send({"type": "message", "content": "Tell me a long story",
                           "params": {"temperature": 0.8, "max_new_tokens": 200}})
            started = await ws.expect("started")
            await ws.expect("token")  # streaming
            streams.append(asyncio.create_task(ws.finish(started)))
        poisoned = []
        for params in POISONS:
            poisoned.append(await attacker.chat("x", params={**params, "max_new_tokens": 24}))
        finished = await asyncio.gather(*streams)
    for answer in finished + poisoned:
        assert answer["done"]["finish_reason"] in ("stop", "length"), answer["done"]
    for answer in poisoned:
        stored = (await rows(db, "SELECT params FROM messages WHERE id = %s", answer["done"]["message_id"]))[0]
        assert stored["params"]["temperature"] == 0, stored


async def test_poisoned_params_over_the_api_answer_greedily(base_url, token):
    async with http(base_url, token) as client:
        for params in POISONS:
            body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, **params}
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")


# -- input: text PostgreSQL and the tokenizer cannot hold --------------------------------------

BAD_TEXT = {"nul": "a\x00b", "surrogate": "a\ud800b"}


@pytest.mark.parametrize("kind", BAD_TEXT)
async def test_bad_text_over_the_websocket(base_url, db, kind):
    bad = BAD_TEXT[kind]
    token = new_token()
    async with connect(base_url, token) as ws:
        error = await ws.error({"type": "message", "content": bad})
        assert error["code"] == "invalid_text" and "'content'" in error["message"], error
        answer = await ws.chat("hello", params={"max_new_tokens": 2})  # still usable
        before = await user_row_counts(db, token)
        error = await ws.error({"type": "feedback", "message_id": answer["done"]["message_id"],
                                "rating": 1, "reason": bad})
        assert error["code"] == "invalid_text" and "'reason'" in error["message"], error
        assert await user_row_counts(db, token) == before


@pytest.mark.parametrize("kind", BAD_TEXT)
async def test_bad_text_over_rest(base_url, db, kind):
    bad = BAD_TEXT[kind]
    token = new_token()
    async with connect(base_url, token) as ws:
        answer = await ws.chat("hello", params={"max_new_tokens": 2})
    before = await user_row_counts(db, token)
    async with http(base_url, token) as client:
        response = await send_json(client, "POST", f"/api/messages/{answer['done']['message_id']}/feedback",
                                   {"rating": -1, "reason": bad})
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "invalid_text" and "'reason'" in response.json()["message"]
        response = await send_json(client, "PATCH", f"/api/conversations/{answer['started']['conversation_id']}",
                                   {"title": bad})
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "invalid_text" and "'title'" in response.json()["message"]
    assert await user_row_counts(db, token) == before


def _api_bodies(bad: str) -> list[tuple[dict, str]]:
    """Every place of a chat completion's messages that holds text, and the field named."""
    user = {"role": "user", "content": "hi"}
    return [
        ({"messages": [{"role": "user", "content": bad}]}, "messages.0.content"),
        ({"messages": [{"role": "system", "content": bad}, user]}, "messages.0.content"),
        ({"messages": [{"role": "developer", "content": bad}, user]}, "messages.0.content"),
        ({"messages": [user, {"role": "assistant", "content": bad}, user]}, "messages.1.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": bad}]}]}, "messages.0.content"),
    ]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize("kind", BAD_TEXT)
async def test_bad_text_over_the_api(base_url, db, kind, stream):
    token = new_token()
    async with http(base_url, token) as client:
        for body, field in _api_bodies(BAD_TEXT[kind]):
            response = await send_json(client, "POST", "/v1/chat/completions", {**body, "stream": stream})
            assert response.status_code == 422, (body, response.text)
            error = response.json()["error"]
            assert error["code"] == "invalid_text" and field in error["message"], error
            assert error["type"] == "invalid_request_error"
    assert await user_row_counts(db, token) == NOTHING


async def test_deeply_nested_json_is_bad_json(base_url, token, db):
    deep = "[" * 50_000
    inside = '{"type": "message", "content": "x", "params": {"temperature": ' + "[" * 5_000 + "]" * 5_000 + "}}"
    async with connect(base_url, token) as ws:
        for text in (deep, inside):
            error = await ws.error(text)
            assert error["code"] == "bad_json" and "nested" in error["message"], error
        await ws.chat("still here", params={"max_new_tokens": 2})
    async with http(base_url, token) as client:
        response = await client.post("/v1/chat/completions", content=deep.encode(),
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "bad_json"
        response = await client.post(f"/api/messages/{uuid.uuid4()}/feedback", content=deep.encode(),
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 400 and response.json()["code"] == "bad_json", response.text


# -- input: strict numbers and booleans ---------------------------------------------------------

STRICT_FRAMES = [
    ({"type": "message", "content": "hi", "params": {"max_new_tokens": "4"}}, "params.max_new_tokens"),
    ({"type": "message", "content": "hi", "params": {"max_new_tokens": True}}, "params.max_new_tokens"),
    ({"type": "message", "content": "hi", "params": {"max_new_tokens": 4.0}}, "params.max_new_tokens"),
    ({"type": "message", "content": "hi", "params": {"temperature": "0.5"}}, "params.temperature"),
    ({"type": "message", "content": "hi", "params": {"temperature": True}}, "params.temperature"),
    ({"type": "message", "content": "hi", "params": {"top_p": "1"}}, "params.top_p"),
    ({"type": "feedback", "message_id": str(uuid.uuid4()), "rating": True}, "rating"),
    ({"type": "feedback", "message_id": str(uuid.uuid4()), "rating": 1.0}, "rating"),
    ({"type": "feedback", "message_id": str(uuid.uuid4()), "rating": "1"}, "rating"),
]


async def test_numbers_and_booleans_are_strict(base_url, db):
    token = new_token()
    async with connect(base_url, token) as ws:
        for frame, field in STRICT_FRAMES:
            error = await ws.error(frame)
            assert error["code"] == "invalid_frame" and f"'{field}'" in error["message"], (frame, error)
    async with http(base_url, token) as client:
        for rating in (True, 1.0, "1"):
            response = await client.post(f"/api/messages/{uuid.uuid4()}/feedback", json={"rating": rating})
            assert response.status_code == 422 and "'rating'" in response.json()["message"], response.text
        user = [{"role": "user", "content": "hi"}]
        for field, value in [("max_tokens", "4"), ("max_tokens", True), ("max_completion_tokens", 4.5),
                             ("temperature", True), ("stream", "yes"), ("stream", 1), ("n", True)]:
            response = await client.post("/v1/chat/completions", json={"messages": user, field: value})
            assert response.status_code == 422, (field, value, response.text)
            assert field in response.json()["error"]["message"]
    assert await user_row_counts(db, token) == NOTHING


# -- limits: websocket connections per user -------------------------------------------------------


async def test_websocket_connections_per_user_are_capped(db_url, engine, tmp_path):
    settings = make_settings(db_url, tmp_path, max_connections_per_user=3)
    token = new_token()
    async with serve(settings, engine) as url:
        async with connect(url, token) as a, connect(url, token), connect(url, token):
            async with connect(url, token) as refused:
                frame = await refused.expect("error")
                assert frame["code"] == "too_many_connections" and "MAX_CONNECTIONS_PER_USER" in frame["message"]
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await refused.recv()
                assert closed.value.rcvd.code == 1008 and closed.value.rcvd.reason == "too_many_connections"
            async with connect(url, new_token()) as other:  # another user is not affected
                await other.chat("hi", params={"max_new_tokens": 2})
            await a.chat("still fine", params={"max_new_tokens": 2})
        # Closed connections give their places back.
        async with connect(url, token) as again:
            await again.chat("back", params={"max_new_tokens": 2})


# -- the OpenAI API's error shape, whatever fails ------------------------------------------------


async def test_api_errors_are_always_in_openais_shape(base_url, token):
    async with http(base_url, token) as client:
        for response, status in [
            (await client.get("/v1/no-such-route"), 404),
            (await client.get("/v1/chat/completions"), 405),
            (await client.post("/v1/chat/completions", content=b"{not json",
                               headers={"Content-Type": "application/json"}), 422),
            (await client.post("/v1/chat/completions", json=[1, 2]), 422),
        ]:
            assert response.status_code == status, response.text
            error = response.json()["error"]
            assert set(error) >= {"message", "type", "code", "param"} and error["message"], error
        response = await client.get("/api/no-such-route")
        assert response.status_code == 404 and response.json()["code"] == "not_found"


# -- authorization: user B against user A's ids ---------------------------------------------------


async def test_user_b_reaches_nothing_of_user_a(base_url, db):
    """Every REST endpoint, every websocket frame type and the OpenAI API, with B's token on
    A's ids: each answered not_found (never a hint that the id exists), and A's rows unchanged."""
    a_token, b_token = new_token(), new_token()
    async with connect(base_url, a_token) as ws:
        first = await ws.chat("A's secret question", params={"max_new_tokens": 4})
        await ws.send({"type": "regenerate", "message_id": first["done"]["message_id"],
                       "params": {"max_new_tokens": 4}})
        second = await ws.answer()
    conversation = first["started"]["conversation_id"]
    question, answer, sibling = (first["started"]["parent_id"], first["done"]["message_id"],
                                 second["done"]["message_id"])
    a_before = await user_row_counts(db, a_token)

    async with connect(base_url, b_token) as ws:
        own = await ws.chat("B's own question", params={"max_new_tokens": 4})
    own_answer = own["done"]["message_id"]
    attempts = 0

    async with http(base_url, b_token) as client:
        for method, path, body in [
            ("GET", f"/api/conversations/{conversation}", None),
            ("PATCH", f"/api/conversations/{conversation}", {"title": "mine now"}),
            ("PATCH", f"/api/conversations/{conversation}", {"allow_data_use": False}),
            ("GET", f"/api/conversations?before={conversation}", None),
            ("POST", f"/api/messages/{answer}/feedback", {"rating": -1}),
            ("POST", f"/api/messages/{question}/feedback", {"rating": 1}),
            ("POST", f"/api/messages/{answer}/compare", {"other_id": sibling, "verdict": "worse"}),
            ("POST", f"/api/messages/{own_answer}/compare", {"other_id": answer, "verdict": "better"}),
        ]:
            response = await client.request(method, path, json=body)
            attempts += 1
            assert response.status_code == 404 and response.json()["code"] == "not_found", (path, response.text)
        listed = (await client.get("/api/conversations")).json()
        assert conversation not in [c["id"] for c in listed]

        # The API: B re-sends A's exact conversation; it must not land in A's tree.
        reply = await client.post("/v1/chat/completions", json={
            "messages": [{"role": "user", "content": "A's secret question"},
                         {"role": "assistant", "content": first["text"]},
                         {"role": "user", "content": "and more"}], "max_tokens": 2})
        attempts += 1
        assert reply.status_code == 200, reply.text
        stored = (await rows(db, "SELECT conversation_id FROM messages WHERE id = %s", reply.json()["id"]))[0]
        assert str(stored["conversation_id"]) != conversation
        response = await client.post("/v1/chat/completions", json={
            "model": "default", "messages": [{"role": "user", "content": "hi"}], "user": conversation,
            "max_tokens": 2})
        attempts += 1
        assert response.status_code == 200

    async with connect(base_url, b_token) as ws:
        for frame in [
            {"type": "message", "content": "hi", "conversation_id": conversation},
            {"type": "message", "content": "hi", "conversation_id": conversation, "parent_id": answer},
            {"type": "regenerate", "message_id": answer},
            {"type": "feedback", "message_id": answer, "rating": 1},
            {"type": "compare", "message_id": answer, "other_id": sibling, "verdict": "same"},
            {"type": "compare", "message_id": own_answer, "other_id": sibling, "verdict": "same"},
        ]:
            error = await ws.error(frame)
            attempts += 1
            assert error["code"] == "not_found", (frame, error)

    # cancel: B naming A's running answer must not stop it.
    async with connect(base_url, a_token) as a_ws, connect(base_url, b_token) as b_ws:
        await a_ws.send({"type": "message", "content": "long", "conversation_id": conversation,
                         "params": {"max_new_tokens": 48}})
        started = await a_ws.expect("started")
        await b_ws.send({"type": "cancel", "message_id": started["message_id"]})
        await b_ws.send({"type": "cancel"})
        attempts += 2
        done = await a_ws.finish(started)
        assert done["done"]["finish_reason"] in ("stop", "length")
    after = await user_row_counts(db, a_token)
    assert after == {**a_before, "messages": a_before["messages"] + 2}  # only A's own new turn
    title = (await rows(db, "SELECT title, allow_data_use FROM conversations WHERE id = %s", conversation))[0]
    assert title == {"title": "A's secret question", "allow_data_use": True}
    assert attempts >= 17
