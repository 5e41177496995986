"""The HTTP API against a real server and PostgreSQL: conversations and trees, feedback and
comparisons for API users, chat completions (plain HTTP; the openai client has its own file),
health, version, docs, identities, and the refusals."""

from __future__ import annotations

import asyncio
import json
import uuid

import httpx

from server_testkit import connect, http, make_settings, new_token, rows, serve, user_row_counts


async def chat_completion(client: httpx.AsyncClient, messages, **fields) -> dict:
    response = await client.post("/v1/chat/completions", json={"model": "default", "messages": messages, **fields})
    assert response.status_code == 200, response.text
    return response.json()


# -- conversations --------------------------------------------------------------------------------


async def test_conversations_list_and_tree(base_url, token):
    async with connect(base_url, token) as ws:
        first = await ws.chat("Older conversation")
        second = await ws.chat("Newer conversation", conversation_id=None)
        await ws.send({"type": "regenerate", "message_id": second["started"]["message_id"]})
        again = await ws.answer()
        await ws.send({"type": "feedback", "message_id": again["started"]["message_id"], "rating": 1})
        await ws.expect("ack")
    async with http(base_url, token) as client:
        listed = (await client.get("/api/conversations")).json()
        assert [c["id"] for c in listed] == [second["started"]["conversation_id"], first["started"]["conversation_id"]]
        assert listed[0]["title"] == "Newer conversation"
        page = (await client.get("/api/conversations", params={"limit": 1, "before": listed[0]["id"]})).json()
        assert [c["id"] for c in page] == [listed[1]["id"]]

        tree = (await client.get(f"/api/conversations/{listed[0]['id']}")).json()
    by_id = {m["id"]: m for m in tree["messages"]}
    question = by_id[second["started"]["parent_id"]]
    answers = [m for m in tree["messages"] if m["parent_id"] == question["id"]]
    assert [a["id"] for a in answers] == [second["started"]["message_id"], again["started"]["message_id"]]
    assert answers[0]["content"] == second["text"] and answers[1]["content"] == again["text"]
    assert answers[1]["rating"] == 1 and answers[0]["rating"] is None
    assert answers[0]["model_version"] == second["started"]["model_version"]
    assert answers[0]["finish_reason"] == second["done"]["finish_reason"]
    assert set(answers[0]["params"]) == {"temperature", "top_p", "max_new_tokens"}


async def test_trees_are_private_and_ids_checked(base_url, token):
    async with connect(base_url, token) as ws:
        answer = await ws.chat("Mine")
    conversation_id = answer["started"]["conversation_id"]
    async with http(base_url, new_token()) as stranger:
        response = await stranger.get(f"/api/conversations/{conversation_id}")
        assert response.status_code == 404 and response.json()["code"] == "not_found"
        assert (await stranger.get("/api/conversations")).json() == []
        response = await stranger.get("/api/conversations/not-a-uuid")
        assert response.status_code == 400 and response.json()["code"] == "invalid_id"
        response = await stranger.get("/api/conversations", params={"limit": 0})
        assert response.status_code == 422 and "limit" in response.json()["message"]


# -- feedback over HTTP ---------------------------------------------------------------------------


async def test_opting_a_conversation_out_of_training(base_url, token, db):
    async with connect(base_url, token) as ws:
        answer = await ws.chat("Keep this one private")
    conversation_id = answer["started"]["conversation_id"]
    path = f"/api/conversations/{conversation_id}"
    async with http(base_url, token) as client:
        assert (await client.get(path)).json()["allow_data_use"] is True
        response = await client.patch(path, json={"allow_data_use": False})
        assert response.status_code == 200, response.text
        assert response.json()["allow_data_use"] is False and response.json()["title"] == "Keep this one private"
        assert (await client.get(path)).json()["allow_data_use"] is False
        assert (await client.get("/api/conversations")).json()[0]["allow_data_use"] is False
        renamed = (await client.patch(path, json={"title": "Private"})).json()
        assert renamed["title"] == "Private" and renamed["allow_data_use"] is False

        bad = await client.patch(path, json={"allow_data_use": "no"})
        assert bad.status_code == 422 and "allow_data_use" in bad.json()["message"]
        unknown = await client.patch(path, json={"private": True})
        assert unknown.status_code == 422 and "private" in unknown.json()["message"]
    async with http(base_url, new_token()) as stranger:
        response = await stranger.patch(path, json={"allow_data_use": True})
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    stored = await rows(db, "SELECT allow_data_use FROM conversations WHERE id = %s", conversation_id)
    assert [row["allow_data_use"] for row in stored] == [False]


async def test_feedback_and_compare_over_http(base_url, token, db):
    async with http(base_url, token) as client:
        messages = [{"role": "user", "content": "Name a colour"}]
        first = await chat_completion(client, messages)
        # The same messages again: the answer is a sibling of the first (same stored parent).
        second = await chat_completion(client, messages)

        response = await client.post(f"/api/messages/{first['id']}/feedback", json={"rating": -1, "reason": "dull"})
        assert response.status_code == 200, response.text
        ack = response.json()
        assert ack["of"] == "feedback"
        response = await client.post(
            f"/api/messages/{second['id']}/compare", json={"other_id": first["id"], "verdict": "better"}
        )
        assert response.status_code == 200, response.text
        compared = response.json()
        assert compared["of"] == "compare"

        # Refusals, each writing nothing.
        before = await user_row_counts(db, token)
        refusals = [
            (f"/api/messages/{first['id']}/feedback", {"rating": 3}, 422, "invalid_frame"),
            (f"/api/messages/{first['id']}/feedback", {}, 422, "invalid_frame"),
            (f"/api/messages/{uuid.uuid4()}/feedback", {"rating": 1}, 404, "not_found"),
            ("/api/messages/nope/feedback", {"rating": 1}, 400, "invalid_id"),
            (f"/api/messages/{first['id']}/compare", {"other_id": first["id"], "verdict": "same"}, 422, "self_comparison"),
            (f"/api/messages/{first['id']}/compare", {"other_id": first["id"], "verdict": "meh"}, 422, "invalid_frame"),
        ]
        for path, body, status, code in refusals:
            response = await client.post(path, json=body)
            assert (response.status_code, response.json()["code"]) == (status, code), (path, body, response.text)
            assert response.json()["message"]
        response = await client.post(
            f"/api/messages/{first['id']}/feedback", content=b"{not json", headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 422 and "JSON" in response.json()["message"]
        assert await user_row_counts(db, token) == before

    (rating,) = await rows(db, "SELECT * FROM ratings WHERE id = %s", ack["id"])
    assert (str(rating["message_id"]), rating["rating"], rating["reason"]) == (first["id"], -1, "dull")
    (comparison,) = await rows(db, "SELECT * FROM comparisons WHERE id = %s", compared["id"])
    assert (str(comparison["message_id"]), str(comparison["other_id"])) == (second["id"], first["id"])

    async with http(base_url, new_token()) as stranger:
        response = await stranger.post(f"/api/messages/{first['id']}/feedback", json={"rating": 1})
        assert response.status_code == 404 and response.json()["code"] == "not_found"


# -- chat completions over plain HTTP -------------------------------------------------------------


async def test_completion_is_stored_as_a_conversation_path(base_url, token, db):
    async with http(base_url, token) as client:
        system = {"role": "system", "content": "You are terse."}
        question = {"role": "user", "content": "What is the capital of France?"}
        first = await chat_completion(client, [system, question], temperature=0, max_tokens=5)
        assert first["object"] == "chat.completion"
        choice = first["choices"][0]
        assert choice["message"]["role"] == "assistant" and choice["finish_reason"] in ("stop", "length")
        assert first["usage"]["completion_tokens"] <= 5

        # The client continues by re-sending our answer: the same conversation grows.
        answer = {"role": "assistant", "content": choice["message"]["content"]}
        follow_up = {"role": "user", "content": "And of Italy?"}
        second = await chat_completion(client, [system, question, answer, follow_up], max_tokens=5)

    (stored,) = await rows(db, "SELECT * FROM messages WHERE id = %s", uuid.UUID(first["id"]))
    assert stored["role"] == "assistant" and stored["content"] == choice["message"]["content"]
    assert stored["model_version"] == first["model"]
    assert stored["params"] == {"temperature": 0, "top_p": 0.9, "max_new_tokens": 5}
    path = await rows(
        db,
        """WITH RECURSIVE path AS (
               SELECT id, parent_id, role, content, conversation_id, 0 AS depth FROM messages WHERE id = %s
               UNION ALL
               SELECT m.id, m.parent_id, m.role, m.content, m.conversation_id, depth + 1
               FROM messages m JOIN path ON m.id = path.parent_id)
           SELECT * FROM path ORDER BY depth DESC""",
        uuid.UUID(second["id"]),
    )
    assert [(m["role"], m["content"]) for m in path[:-1]] == [
        ("system", "You are terse."),
        ("user", "What is the capital of France?"),
        ("assistant", choice["message"]["content"]),
        ("user", "And of Italy?"),
    ]
    assert str(path[2]["id"]) == first["id"]  # our own answer, not a client-supplied copy
    assert len({m["conversation_id"] for m in path}) == 1


async def test_client_supplied_history_is_marked(base_url, token, db):
    async with http(base_url, token) as client:
        reply = await chat_completion(client, [
            {"role": "developer", "content": "Be brief."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello! (written by the client)"},
            {"role": "user", "content": [{"type": "text", "text": "Part one."}, {"type": "text", "text": "Part two."}]},
        ], max_tokens=4)
    found = await rows(db, "SELECT role, content, model_version FROM messages WHERE conversation_id = "
                           "(SELECT conversation_id FROM messages WHERE id = %s) ORDER BY created_at", uuid.UUID(reply["id"]))
    assert [(m["role"], m["model_version"]) for m in found] == [
        ("system", None), ("user", None), ("assistant", "client-supplied"), ("user", None),
        ("assistant", reply["model"]),
    ]
    assert found[3]["content"] == "Part one.\nPart two."


async def test_completion_refusals_use_openais_error_shape(base_url, token, db):
    cases = [
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model_not_found"),
        ({"messages": [{"role": "assistant", "content": "hi"}]}, 422, "invalid_frame"),
        ({"messages": []}, 422, "invalid_frame"),
        ({"messages": [{"role": "tool", "content": "hi"}]}, 422, "invalid_frame"),
        ({"messages": [{"role": "user", "content": "hi"}], "n": 2}, 422, "invalid_frame"),
        ({"messages": [{"role": "user", "content": "hi"}], "temperature": 7}, 422, "invalid_params"),
        ({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 10_000}, 422, "invalid_params"),
        ({"messages": [{"role": "user", "content": "x" * 20_001}]}, 413, "too_long"),
        ({"messages": [{"role": "user", "content": "x " * 4000}]}, 413, "prompt_too_long"),
        ({"messages": [{"role": "user", "content": "hi"}, {"role": "system", "content": "late"},
                       {"role": "user", "content": "hi"}]}, 422, "invalid_conversation"),
    ]
    async with http(base_url, token) as client:
        for body, status, code in cases:
            response = await client.post("/v1/chat/completions", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert error["code"] == code and error["message"], error
        response = await client.post("/v1/chat/completions", content=b"x" * (70 * 1024))
        assert response.status_code == 413 and response.json()["error"]["code"] == "frame_too_large"
    assert await user_row_counts(db, token) == {"conversations": 0, "messages": 0, "ratings": 0, "comparisons": 0}


# -- identity -------------------------------------------------------------------------------------


async def test_anonymous_identities(base_url):
    async with http(base_url, None) as client:
        response = await client.get("/api/conversations")
        assert response.status_code == 200
        minted = response.headers["X-Flywheel-Token"]
        assert len(minted) >= 32
        reply = await chat_completion(client, [{"role": "user", "content": "hi"}], max_tokens=2)
    # The minted token comes back as the same user.
    async with http(base_url, minted) as client:
        response = await client.get("/api/conversations")
        assert "X-Flywheel-Token" not in response.headers
    async with http(base_url, new_token()) as client:
        response = await client.post(f"/api/messages/{reply['id']}/feedback", json={"rating": 1})
        assert response.status_code == 404  # not minted's: someone else's
    async with httpx.AsyncClient(base_url=base_url, headers={"Authorization": "Basic abc"}) as client:
        response = await client.get("/api/conversations")
        assert response.status_code == 401 and "Bearer" in response.json()["message"]
    async with http(base_url, "short") as client:
        response = await client.get("/api/conversations")
        assert response.status_code == 401 and response.json()["code"] == "unauthorized"
    async with httpx.AsyncClient(base_url=base_url) as client:
        response = await client.get("/api/conversations", params={"token": new_token()})
        assert response.status_code == 200


async def test_closed_mode_admits_only_known_tokens(db_url, engine, tmp_path, base_url):
    known = new_token()
    async with http(base_url, known) as client:  # registered through the open server
        assert (await client.get("/api/conversations")).status_code == 200
    settings = make_settings(db_url, tmp_path, allow_anonymous=False)
    async with serve(settings, engine) as url:
        async with http(url, known) as client:
            assert (await client.get("/api/conversations")).status_code == 200
        for token in (None, new_token()):
            async with http(url, token) as client:
                response = await client.get("/api/conversations")
                assert response.status_code == 401 and response.json()["code"] == "unauthorized"


async def test_rate_limit_over_http(db_url, engine, tmp_path):
    settings = make_settings(db_url, tmp_path, rate_limit_per_minute=2)
    async with serve(settings, engine) as url:
        async with http(url, new_token()) as client:
            for _ in range(2):
                response = await client.post(f"/api/messages/{uuid.uuid4()}/feedback", json={"rating": 1})
                assert response.status_code == 404
            response = await client.post(f"/api/messages/{uuid.uuid4()}/feedback", json={"rating": 1})
            assert response.status_code == 429 and response.json()["code"] == "rate_limited"
            assert int(response.headers["Retry-After"]) >= 1


# -- service endpoints ----------------------------------------------------------------------------


async def test_health_version_models_docs_and_page(base_url):
    async with http(base_url, None) as client:
        health = await client.get("/health")
        assert health.status_code == 200 and health.json()["status"] == "ok"
        version = (await client.get("/api/version")).json()
        assert version["model_version"] == health.json()["model_version"] and version["engine"] == "local"
        models = (await client.get("/v1/models")).json()
        assert [m["id"] for m in models["data"]][:2] == ["default", version["model_version"]]
        docs = await client.get("/docs")
        assert docs.status_code == 200 and "swagger" in docs.text.lower()
        schema = (await client.get("/openapi.json")).json()
        for path in ("/v1/chat/completions", "/api/conversations/{conversation_id}", "/api/messages/{message_id}/compare"):
            assert path in schema["paths"]
        page = await client.get("/")
        assert page.status_code == 200 and "<title>Flywheel</title>" in page.text
        metrics = (await client.get("/metrics/")).text
        for name in ("flywheel_answers_total", "flywheel_feedback_total", "flywheel_engine_decode_steps_total",
                     "flywheel_refusals_total", "flywheel_time_to_first_token_seconds_bucket"):
            assert name in metrics, name
        assert (await client.get("/static/app.js")).status_code == 200


async def test_the_same_messages_again_reuse_the_prompt_the_engine_already_holds(base_url, token):
    # An API client sending the same messages again (a retry, a regenerate) gets its prompt's
    # keys and values from the KV cache row the first request left: /metrics counts them.
    def counter(text: str, name: str) -> float:
        return sum(float(line.split()[1]) for line in text.splitlines() if line.startswith(name + " "))

    messages = [{"role": "user", "content": f"Name a river ({uuid.uuid4().hex[:8]})."}]
    async with http(base_url, token) as client:
        first = await chat_completion(client, messages, max_tokens=4, temperature=0)
        before = (await client.get("/metrics/")).text
        again = await chat_completion(client, messages, max_tokens=4, temperature=0)
        after = (await client.get("/metrics/")).text
    prompt_tokens = again["usage"]["prompt_tokens"]
    assert prompt_tokens == first["usage"]["prompt_tokens"]
    reused = "flywheel_engine_reused_prompt_tokens_total"
    prefilled = "flywheel_engine_prefill_tokens_total"
    assert counter(after, reused) - counter(before, reused) == prompt_tokens - 1
    assert counter(after, prefilled) - counter(before, prefilled) == 1
    assert again["choices"][0]["message"]["content"] == first["choices"][0]["message"]["content"]


class _Loading:
    """An engine still loading its weights."""

    ready = False
    model_version = "loading"


async def test_health_is_503_and_chat_refused_until_the_model_is_loaded(db_url, tmp_path):
    async with serve(make_settings(db_url, tmp_path), _Loading()) as url:
        async with http(url, new_token()) as client:
            health = await client.get("/health")
            assert health.status_code == 503 and health.json()["status"] == "loading"
            response = await client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 503 and response.json()["error"]["code"] == "not_ready"
        async with connect(url, new_token()) as ws:
            error = await ws.error({"type": "message", "content": "hi"})
            assert error["code"] == "not_ready"


async def test_a_dropped_stream_is_stored_as_cancelled(base_url, token, db):
    body = {"messages": [{"role": "user", "content": "A long story, please"}], "stream": True, "max_tokens": 256}
    async with http(base_url, token) as client:
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = response.aiter_lines()
            first = None
            async for line in lines:
                if line.startswith("data: "):
                    first = json.loads(line[6:])
                    break
            # Leave after the first chunk: the server notices and stores what it had.
    answer_id = uuid.UUID(first["id"])
    for _ in range(100):
        found = await rows(db, "SELECT finish_reason, completion_tokens FROM messages WHERE id = %s", answer_id)
        if found:
            break
        await asyncio.sleep(0.05)
    assert found and found[0]["finish_reason"] == "cancelled"
    assert found[0]["completion_tokens"] < 256


async def test_chunked_bodies_are_limited_too(base_url, token):
    async def chunks(total: int):
        for _ in range(total // 8192):
            yield b" " * 8192

    async with http(base_url, token) as client:
        response = await client.post("/v1/chat/completions", content=chunks(80 * 1024))
        assert response.status_code == 413 and response.json()["error"]["code"] == "frame_too_large"

        async def small():
            yield b'{"rating": 1}'

        response = await client.post(f"/api/messages/{uuid.uuid4()}/feedback", content=small(),
                                     headers={"Content-Type": "application/json"})
        assert response.status_code == 404  # read through, then refused for the unknown id
