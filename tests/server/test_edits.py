"""Edits over the websocket and HTTP against a real server, the tiny model and PostgreSQL: an
answer rewritten into a demonstration (sibling written by the user + "edit beats original"),
the conversation continuing from it, a question rewritten into an answered branch, the tree
showing both, and every bad edit refused with nothing written."""

from __future__ import annotations

import uuid

import pytest
from transformers import AutoTokenizer

from server.prompt import render
from server_testkit import connect, http, new_token, rows, user_row_counts

EDIT = "Paris. Have you been there?"


async def message_row(db, message_id) -> dict:
    found = await rows(db, "SELECT * FROM messages WHERE id = %s", message_id)
    assert found, f"message {message_id} was not stored"
    return found[0]


async def check_demonstration(db, edit_id, original_id) -> None:
    """The rows a demonstration leaves: the sibling written by the user, and its comparison."""
    edit, original = await message_row(db, edit_id), await message_row(db, original_id)
    user = (await rows(db, "SELECT u.id FROM users u JOIN conversations c ON c.user_id = u.id WHERE c.id = %s",
                       original["conversation_id"]))[0]["id"]
    assert (edit["role"], edit["parent_id"], edit["conversation_id"]) == (
        "assistant", original["parent_id"], original["conversation_id"])
    assert (edit["author_id"], edit["edited_from"], edit["model_version"]) == (user, original["id"], None)
    comparisons = await rows(db, "SELECT message_id, other_id, user_id, verdict FROM comparisons WHERE message_id = %s", edit["id"])
    assert comparisons == [{"message_id": edit["id"], "other_id": original["id"], "user_id": user, "verdict": "better"}]


async def test_editing_an_answer_over_the_websocket_stores_a_demonstration(base_url, token, db, tiny_model_dir):
    async with connect(base_url, token) as ws:
        first = await ws.chat("What is the capital of France?")
        answer_id = first["started"]["message_id"]
        await ws.send({"type": "edit", "message_id": answer_id, "content": EDIT})
        ack = await ws.expect("ack")
        assert ack["of"] == "edit"
        edit_id = ack["id"]
        await check_demonstration(db, edit_id, answer_id)

        # The conversation continues from the edited answer, with it as context.
        follow = await ws.chat("Yes, last year.", conversation_id=first["started"]["conversation_id"],
                               parent_id=edit_id)
    question = await message_row(db, follow["started"]["parent_id"])
    assert question["parent_id"] == uuid.UUID(edit_id)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    expected = render(tokenizer, [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": EDIT},
        {"role": "user", "content": "Yes, last year."},
    ])
    assert follow["done"]["usage"]["prompt_tokens"] == len(expected)

    # Without parent_id the conversation continues from the newest message: the follow-up.
    async with http(base_url, token) as client:
        tree = (await client.get(f"/api/conversations/{first['started']['conversation_id']}")).json()
    by_id = {m["id"]: m for m in tree["messages"]}
    siblings = [m for m in tree["messages"] if m["parent_id"] == first["started"]["parent_id"]]
    assert [m["id"] for m in siblings] == [answer_id, edit_id]
    assert by_id[edit_id]["written_by"] == "user" and by_id[edit_id]["edited_from"] == answer_id
    assert by_id[edit_id]["model_version"] is None and by_id[edit_id]["content"] == EDIT
    assert by_id[answer_id]["written_by"] == "model" and by_id[answer_id]["edited_from"] is None


async def test_editing_a_question_answers_a_new_branch(base_url, token, db):
    async with connect(base_url, token) as ws:
        first = await ws.chat("What is the capital of France?")
        old_question = first["started"]["parent_id"]
        await ws.send({"type": "edit", "message_id": old_question, "content": "And of Spain?",
                       "params": {"max_new_tokens": 4}})
        branch = await ws.answer()
    new_question = await message_row(db, branch["started"]["parent_id"])
    assert new_question["id"] != uuid.UUID(old_question)
    assert (new_question["role"], new_question["parent_id"], new_question["content"]) == ("user", None, "And of Spain?")
    assert new_question["edited_from"] == uuid.UUID(old_question) and new_question["author_id"] is not None
    assert branch["started"]["conversation_id"] == first["started"]["conversation_id"]
    answer = await message_row(db, branch["started"]["message_id"])
    assert answer["parent_id"] == new_question["id"] and answer["content"] == branch["text"]
    assert answer["completion_tokens"] <= 4
    async with http(base_url, token) as client:
        tree = (await client.get(f"/api/conversations/{first['started']['conversation_id']}")).json()
    roots = [m for m in tree["messages"] if m["parent_id"] is None]
    assert [m["id"] for m in roots] == [old_question, str(new_question["id"])]  # the old branch stays
    assert roots[1]["written_by"] == "user" and roots[1]["edited_from"] == old_question


async def test_editing_an_answer_over_http_returns_the_new_message(base_url, token, db):
    async with http(base_url, token) as client:
        completion = await client.post("/v1/chat/completions", json={
            "model": "default", "messages": [{"role": "user", "content": "Name a colour"}]})
        answer_id = completion.json()["id"]
        response = await client.post(f"/api/messages/{answer_id}/edit", json={"content": "Blue."})
    assert response.status_code == 201, response.text
    body = response.json()
    assert body["content"] == "Blue." and body["role"] == "assistant"
    assert body["written_by"] == "user" and body["edited_from"] == answer_id
    await check_demonstration(db, body["id"], answer_id)


async def _world(base_url, token) -> dict:
    async with connect(base_url, token) as ws:
        first = await ws.chat("What is the capital of France?")
    return {"answer": first["started"]["message_id"], "question": first["started"]["parent_id"]}


WS_REFUSALS = {
    # case: (frame built from the world, error code, words the message must say)
    "unknown id": (lambda w: {"message_id": str(uuid.uuid4()), "content": "x"}, "not_found", "no message"),
    "empty content": (lambda w: {"message_id": w["answer"], "content": ""}, "empty_content", "empty"),
    "whitespace content": (lambda w: {"message_id": w["question"], "content": "  "}, "empty_content", "empty"),
    "over-long content": (lambda w: {"message_id": w["answer"], "content": "x" * 20_001}, "too_long", "20000"),
    "NUL": (lambda w: {"message_id": w["answer"], "content": "a\x00b"}, "invalid_input", "NUL"),
    "lone surrogate": (lambda w: {"message_id": w["answer"], "content": "a\ud800b"}, "invalid_input", "surrogate"),
    "unchanged": (lambda w: {"message_id": w["question"], "content": "What is the capital of France?"},
                  "unchanged_edit", "same text"),
    "params on an answer": (lambda w: {"message_id": w["answer"], "content": "y", "params": {"temperature": 0}},
                            "invalid_input", "params"),
    "no content": (lambda w: {"message_id": w["answer"]}, "invalid_frame", "content"),
}


@pytest.mark.parametrize("case", list(WS_REFUSALS))
async def test_bad_edits_over_the_websocket_get_an_error_and_write_nothing(case, base_url, token, db):
    build, code, says = WS_REFUSALS[case]
    world = await _world(base_url, token)
    before = await user_row_counts(db, token)
    async with connect(base_url, token) as ws:
        frame = {"type": "edit", **build(world)}
        # json.dumps would escape a lone surrogate as \ud800, which JSON allows: the server
        # receives it as such and must refuse it itself.
        error = await ws.error(frame)
        assert error["code"] == code and says in error["message"], error
        # The connection stays usable: the next frame is answered.
        await ws.send({"type": "feedback", "message_id": world["answer"], "rating": 5})
        assert (await ws.expect("error"))["code"] == "invalid_frame"
    assert await user_row_counts(db, token) == before


async def test_another_users_message_is_not_found_and_roles_are_named(base_url, token, db):
    world = await _world(base_url, token)
    stranger = new_token()
    async with connect(base_url, stranger) as ws:
        error = await ws.error({"type": "edit", "message_id": world["answer"], "content": "mine now"})
        assert error["code"] == "not_found"
    async with http(base_url, stranger) as client:
        response = await client.post(f"/api/messages/{world['answer']}/edit", json={"content": "mine"})
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    before = await user_row_counts(db, token)
    async with http(base_url, token) as client:
        # A question through the answer path: says it is a user message and what to do.
        response = await client.post(f"/api/messages/{world['question']}/edit", json={"content": "Spain?"})
        assert response.status_code == 422 and response.json()["code"] == "wrong_role"
        assert "is a user message" in response.json()["message"] and "assistant" in response.json()["message"]
        response = await client.post(f"/api/messages/{world['answer']}/edit", json={"content": ""})
        assert response.status_code == 422 and response.json()["code"] == "empty_content"
        response = await client.post(f"/api/messages/not-an-id/edit", json={"content": "x"})
        assert response.status_code == 400 and response.json()["code"] == "invalid_id"
        response = await client.post(f"/api/messages/{world['answer']}/edit", json={"text": "x"})
        assert response.status_code == 422
    assert await user_row_counts(db, token) == before
    assert await user_row_counts(db, stranger) == {"conversations": 0, "messages": 0, "ratings": 0, "comparisons": 0}
