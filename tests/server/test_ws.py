"""The websocket /ws against a real server, the tiny model and PostgreSQL: each flow of the
contract checked frame by frame and against the rows it leaves; every bad input answered with
an error frame on a connection that stays usable, and nothing written."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
import websockets

from server_testkit import connect, make_settings, new_token, rows, serve, user_row_counts


async def message_row(db, message_id) -> dict:
    found = await rows(db, "SELECT * FROM messages WHERE id = %s", message_id)
    assert found, f"message {message_id} was not stored"
    return found[0]


# -- the happy paths -----------------------------------------------------------------------------


async def test_message_streams_an_answer_and_stores_both_turns(base_url, token, db):
    async with connect(base_url, token) as ws:
        answer = await ws.chat("What is the capital of France?")
    started, done = answer["started"], answer["done"]
    assert set(started) == {"type", "conversation_id", "message_id", "parent_id", "model_version"}
    assert answer["tokens"], "no token frames were streamed"
    assert done["finish_reason"] in ("stop", "length")
    usage = done["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0

    question = await message_row(db, started["parent_id"])
    assert question["role"] == "user" and question["parent_id"] is None
    assert question["content"] == "What is the capital of France?"
    assert str(question["conversation_id"]) == started["conversation_id"]

    stored = await message_row(db, started["message_id"])
    assert stored["role"] == "assistant"
    assert stored["parent_id"] == question["id"]
    assert stored["content"] == answer["text"]
    assert stored["model_version"] == started["model_version"]
    assert stored["finish_reason"] == done["finish_reason"]
    assert stored["prompt_tokens"] == usage["prompt_tokens"]
    assert stored["completion_tokens"] == usage["completion_tokens"]
    assert set(stored["params"]) == {"temperature", "top_p", "max_new_tokens"}

    conversation = (await rows(db, "SELECT * FROM conversations WHERE id = %s", question["conversation_id"]))[0]
    assert conversation["title"] == "What is the capital of France?"


async def test_history_is_context_and_turns_chain(base_url, token, db):
    async with connect(base_url, token) as ws:
        first = await ws.chat("What is the capital of France?")
        conversation_id = first["started"]["conversation_id"]
        # No parent_id: continue from the newest message (the first answer).
        second = await ws.chat("And of Italy?", conversation_id=conversation_id)
    assert second["started"]["conversation_id"] == conversation_id
    follow_up = await message_row(db, second["started"]["parent_id"])
    assert follow_up["parent_id"] == uuid.UUID(first["started"]["message_id"])
    # The second prompt holds the first exchange.
    assert second["done"]["usage"]["prompt_tokens"] > first["done"]["usage"]["prompt_tokens"]


async def test_parent_id_branches_an_earlier_turn(base_url, token, db):
    async with connect(base_url, token) as ws:
        first = await ws.chat("Hello")
        conversation_id = first["started"]["conversation_id"]
        await ws.chat("Second turn", conversation_id=conversation_id)
        branch = await ws.chat(
            "Another second turn",
            conversation_id=conversation_id,
            parent_id=first["started"]["message_id"],
        )
    edited = await message_row(db, branch["started"]["parent_id"])
    assert edited["parent_id"] == uuid.UUID(first["started"]["message_id"])


async def test_params_are_bounded_used_and_recorded(base_url, token, db):
    params = {"temperature": 0, "top_p": 0.5, "max_new_tokens": 3}
    async with connect(base_url, token) as ws:
        answer = await ws.chat("Count to ten", params=params)
    assert answer["done"]["usage"]["completion_tokens"] <= 3
    stored = await message_row(db, answer["started"]["message_id"])
    assert stored["params"] == params


async def test_regenerate_makes_a_sibling_then_feedback_and_compare(base_url, token, db):
    async with connect(base_url, token) as ws:
        first = await ws.chat("Tell me a joke")
        await ws.send({"type": "regenerate", "message_id": first["started"]["message_id"]})
        second = await ws.answer()
        assert second["started"]["parent_id"] == first["started"]["parent_id"]
        assert second["started"]["conversation_id"] == first["started"]["conversation_id"]
        assert second["started"]["message_id"] != first["started"]["message_id"]

        await ws.send({"type": "feedback", "message_id": first["started"]["message_id"], "rating": -1, "reason": "not funny"})
        thumb = await ws.expect("ack")
        await ws.send({"type": "feedback", "message_id": second["started"]["message_id"], "rating": 1})
        other_thumb = await ws.expect("ack")
        await ws.send({
            "type": "compare",
            "message_id": second["started"]["message_id"],
            "other_id": first["started"]["message_id"],
            "verdict": "better",
        })
        verdict = await ws.expect("ack")

    assert thumb["of"] == "feedback" and other_thumb["of"] == "feedback" and verdict["of"] == "compare"
    siblings = await rows(
        db,
        "SELECT id FROM messages WHERE parent_id = %s AND role = 'assistant' ORDER BY created_at",
        uuid.UUID(first["started"]["parent_id"]),
    )
    assert [str(r["id"]) for r in siblings] == [first["started"]["message_id"], second["started"]["message_id"]]

    (rating,) = await rows(db, "SELECT * FROM ratings WHERE id = %s", thumb["id"])
    assert str(rating["message_id"]) == first["started"]["message_id"]
    assert (rating["rating"], rating["reason"]) == (-1, "not funny")
    (comparison,) = await rows(db, "SELECT * FROM comparisons WHERE id = %s", verdict["id"])
    assert str(comparison["message_id"]) == second["started"]["message_id"]
    assert str(comparison["other_id"]) == first["started"]["message_id"]
    assert comparison["verdict"] == "better"


async def test_rating_again_replaces_the_vote_and_keeps_history(base_url, token, db):
    async with connect(base_url, token) as ws:
        answer = await ws.chat("Hi")
        message_id = answer["started"]["message_id"]
        await ws.send({"type": "feedback", "message_id": message_id, "rating": 1})
        first = await ws.expect("ack")
        await ws.send({"type": "feedback", "message_id": message_id, "rating": -1})
        second = await ws.expect("ack")
    assert first["id"] == second["id"]
    (vote,) = await rows(db, "SELECT rating FROM ratings WHERE id = %s", first["id"])
    assert vote["rating"] == -1
    history = await rows(db, "SELECT rating FROM rating_changes WHERE rating_id = %s ORDER BY id", first["id"])
    assert [h["rating"] for h in history] == [1, -1]


async def test_cancel_stops_the_answer_and_stores_the_partial_text(base_url, token, db):
    async with connect(base_url, token) as ws:
        await ws.send({"type": "message", "content": "Write a long story", "params": {"max_new_tokens": 256}})
        started = await ws.expect("started")
        first_token = await ws.expect("token")
        await ws.send({"type": "cancel"})
        # Tokens already on their way may arrive before the done frame.
        answer = await ws.finish(started)
        assert answer["done"]["finish_reason"] == "cancelled"
        assert answer["done"]["usage"]["completion_tokens"] < 256
        # The connection is still usable after a cancel, and a stray cancel is harmless.
        await ws.send({"type": "cancel"})
        after = await ws.chat("Still there?", conversation_id=started["conversation_id"])
    stored = await message_row(db, started["message_id"])
    assert stored["finish_reason"] == "cancelled"
    assert stored["completion_tokens"] == answer["done"]["usage"]["completion_tokens"]
    # Exactly what the client saw was stored.
    assert stored["content"] == first_token["text"] + answer["text"]
    assert after["done"]["finish_reason"] in ("stop", "length")


async def test_a_closed_socket_stores_the_answer_as_cancelled(base_url, token, db):
    async with connect(base_url, token) as ws:
        await ws.send({"type": "message", "content": "Write a long story", "params": {"max_new_tokens": 256}})
        started = await ws.expect("started")
        await ws.expect("token")
    # The server notices the close, cancels the generation and stores what it had.
    for _ in range(100):
        found = await rows(db, "SELECT * FROM messages WHERE id = %s", uuid.UUID(started["message_id"]))
        if found:
            break
        await asyncio.sleep(0.05)
    assert found, "the interrupted answer was not stored"
    assert found[0]["finish_reason"] == "cancelled"
    assert found[0]["completion_tokens"] < 256


async def test_two_conversations_stream_at_once_on_one_socket(base_url, token, db):
    async with connect(base_url, token) as ws:
        await ws.send({"type": "message", "content": "First", "params": {"max_new_tokens": 8}})
        await ws.send({"type": "message", "content": "Second", "params": {"max_new_tokens": 8}})
        done = {}
        started = []
        while len(done) < 2:
            frame = await ws.recv()
            if frame["type"] == "started":
                started.append(frame)
            elif frame["type"] == "done":
                done[frame["message_id"]] = frame
    assert {s["message_id"] for s in started} == set(done)
    assert len({s["conversation_id"] for s in started}) == 2


# -- bad input: an error frame, the connection stays usable, nothing written ---------------------

UNKNOWN = str(uuid.uuid4())

BAD_FRAMES = [
    ("not json at all", "bad_json", "not valid JSON"),
    ('{"type": "message", "content": "hi"', "bad_json", "not valid JSON"),
    ("[1, 2, 3]", "invalid_frame", "JSON object"),
    ({"content": "hi"}, "unknown_type", "no 'type'"),
    ({"type": "shout", "content": "hi"}, "unknown_type", "'shout'"),
    ({"type": "message"}, "invalid_frame", "'content' is missing"),
    ({"type": "message", "content": ""}, "invalid_frame", "content"),
    ({"type": "message", "content": 42}, "invalid_frame", "content"),
    ({"type": "message", "content": "hi", "conversationId": UNKNOWN}, "invalid_frame", "'conversationId' is not a field"),
    ({"type": "message", "content": "hi", "conversation_id": "abc"}, "invalid_frame", "conversation_id"),
    ({"type": "message", "content": "hi", "params": {"temperature": "hot"}}, "invalid_frame", "params.temperature"),
    ({"type": "message", "content": "hi", "params": {"top_p": 1.5}}, "invalid_frame", "params.top_p"),
    ({"type": "message", "content": "hi", "params": {"temperature": 9}}, "invalid_params", "MAX_TEMPERATURE"),
    ({"type": "message", "content": "hi", "params": {"max_new_tokens": 100_000}}, "invalid_params", "MAX_NEW_TOKENS_LIMIT"),
    ({"type": "message", "content": "x" * 20_001}, "too_long", "content"),
    ({"type": "message", "content": "hi", "conversation_id": UNKNOWN}, "not_found", UNKNOWN),
    ({"type": "message", "content": "hi", "parent_id": UNKNOWN}, "invalid_input", "conversation_id"),
    ({"type": "regenerate"}, "invalid_frame", "'message_id' is missing"),
    ({"type": "regenerate", "message_id": UNKNOWN}, "not_found", UNKNOWN),
    ({"type": "feedback", "message_id": UNKNOWN, "rating": 1}, "not_found", UNKNOWN),
    ({"type": "feedback", "message_id": UNKNOWN, "rating": 5}, "invalid_frame", "'rating'"),
    ({"type": "feedback", "message_id": UNKNOWN, "rating": "up"}, "invalid_frame", "'rating'"),
    ({"type": "feedback", "message_id": "not-an-id", "rating": 1}, "invalid_frame", "message_id"),
    ({"type": "compare", "message_id": UNKNOWN, "other_id": UNKNOWN, "verdict": "meh"}, "invalid_frame", "'verdict'"),
    ({"type": "compare", "message_id": UNKNOWN, "other_id": str(uuid.uuid4()), "verdict": "better"}, "not_found", UNKNOWN),
    ({"type": "cancel", "message_id": 7}, "invalid_frame", "message_id"),
]


@pytest.mark.parametrize(("frame", "code", "says"), BAD_FRAMES, ids=[f"{c}-{i}" for i, (_, c, _) in enumerate(BAD_FRAMES)])
async def test_bad_frames_get_an_error_and_write_nothing(base_url, db, frame, code, says):
    token = new_token()
    async with connect(base_url, token) as ws:
        error = await ws.error(frame)
        assert error["code"] == code, error
        assert says in error["message"], error
        assert set(error) == {"type", "code", "message"}
        counts = await user_row_counts(db, token)
        assert counts == {"conversations": 0, "messages": 0, "ratings": 0, "comparisons": 0}
        # Still usable.
        answer = await ws.chat("Still there?")
        assert answer["done"]["finish_reason"] in ("stop", "length")


async def test_binary_and_oversized_frames_are_refused_on_a_usable_connection(base_url, token):
    async with connect(base_url, token) as ws:
        await ws.connection.send(b"\x00\x01binary")
        error = await ws.expect("error")
        assert error["code"] == "invalid_frame" and "text frame" in error["message"]
        huge = json.dumps({"type": "message", "content": "x" * (70 * 1024)})
        error = await ws.error(huge)
        assert error["code"] == "frame_too_large" and "MAX_FRAME_BYTES" in error["message"]
        assert (await ws.chat("Still there?"))["done"]


async def test_refusals_about_roles_and_siblings(base_url, token, db):
    async with connect(base_url, token) as ws:
        first = await ws.chat("One")
        other = await ws.chat("Two")  # continues the newest message: not a sibling of `first`
        question_id = first["started"]["parent_id"]
        before = await user_row_counts(db, token)

        error = await ws.error({"type": "feedback", "message_id": question_id, "rating": 1})
        assert error["code"] == "not_assistant"
        error = await ws.error({"type": "regenerate", "message_id": question_id})
        assert error["code"] == "not_assistant"
        error = await ws.error({
            "type": "compare", "message_id": first["started"]["message_id"],
            "other_id": first["started"]["message_id"], "verdict": "same",
        })
        assert error["code"] == "self_comparison"
        error = await ws.error({
            "type": "compare", "message_id": first["started"]["message_id"],
            "other_id": other["started"]["message_id"], "verdict": "same",
        })
        assert error["code"] == "not_sibling"
        error = await ws.error({
            "type": "message", "content": "hi", "conversation_id": first["started"]["conversation_id"],
            "parent_id": str(uuid.uuid4()),
        })
        assert error["code"] == "not_found"
        assert await user_row_counts(db, token) == before


async def test_another_users_ids_are_not_found(base_url, db):
    owner, stranger = new_token(), new_token()
    async with connect(base_url, owner) as ws:
        first = await ws.chat("Private question")
        await ws.send({"type": "regenerate", "message_id": first["started"]["message_id"]})
        second = await ws.answer()
    mine = first["started"]
    attempts = [
        {"type": "message", "content": "hijack", "conversation_id": mine["conversation_id"]},
        {"type": "message", "content": "hijack", "conversation_id": mine["conversation_id"], "parent_id": mine["message_id"]},
        {"type": "regenerate", "message_id": mine["message_id"]},
        {"type": "feedback", "message_id": mine["message_id"], "rating": -1},
        {"type": "compare", "message_id": mine["message_id"], "other_id": second["started"]["message_id"], "verdict": "worse"},
    ]
    owner_before = await user_row_counts(db, owner)
    async with connect(base_url, stranger) as ws:
        for frame in attempts:
            error = await ws.error(frame)
            assert error["code"] == "not_found", (frame, error)
        assert (await ws.chat("My own question"))["done"]
    assert await user_row_counts(db, owner) == owner_before
    counts = await user_row_counts(db, stranger)
    assert counts["conversations"] == 1 and counts["ratings"] == 0 and counts["comparisons"] == 0


async def test_concurrent_generation_limit_and_rate_limit(db_url, engine, tmp_path, db):
    settings = make_settings(db_url, tmp_path, max_concurrent_generations=1, rate_limit_per_minute=4)
    async with serve(settings, engine) as url:
        token = new_token()
        async with connect(url, token) as ws:
            # 1: a long answer holds the user's only slot.
            await ws.send({"type": "message", "content": "Long one", "params": {"max_new_tokens": 256}})
            started = await ws.expect("started")
            before = await user_row_counts(db, token)
            # 2: refused while the first runs, on this socket or another.
            await ws.send({"type": "message", "content": "Another"})
            while (frame := await ws.recv())["type"] == "token":
                pass
            assert frame["type"] == "error" and frame["code"] == "too_many_generations", frame
            assert "MAX_CONCURRENT_GENERATIONS" in frame["message"]
            async with connect(url, token) as second_socket:
                error = await second_socket.error({"type": "message", "content": "From elsewhere"})
                assert error["code"] == "too_many_generations"
            assert await user_row_counts(db, token) == before  # the refused messages were not stored
            await ws.send({"type": "cancel"})
            await ws.finish(started)
            # 4 requests this minute (the refused ones count too): the 5th is refused.
            await ws.send({"type": "feedback", "message_id": started["message_id"], "rating": 1})
            await ws.expect("ack")
            error = await ws.error({"type": "message", "content": "Too soon"})
            assert error["code"] == "rate_limited", error
            assert "RATE_LIMIT_PER_MINUTE" in error["message"]
        # Limits are per user: someone else is unaffected.
        async with connect(url, new_token()) as ws:
            assert (await ws.chat("Hello"))["done"]


async def test_tokens_are_required_when_anonymous_users_are_not_admitted(db_url, engine, tmp_path):
    settings = make_settings(db_url, tmp_path, allow_anonymous=False)
    async with serve(settings, engine) as url:
        for token in (None, new_token()):
            async with connect(url, token) as ws:
                error = await ws.expect("error")
                assert error["code"] == "unauthorized"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv()
                assert closed.value.rcvd.code == 1008


async def test_short_self_chosen_tokens_are_refused(base_url):
    async with connect(base_url, "short") as ws:
        error = await ws.expect("error")
        assert error["code"] == "unauthorized" and "at least 16" in error["message"]


async def test_no_token_gets_a_minted_identity(base_url, db):
    async with connect(base_url, None) as ws:
        minted = ws.connection.response.headers["X-Flywheel-Token"]
        answer = await ws.chat("Who am I?")
    # Coming back with the minted token is coming back as the same user.
    counts = await user_row_counts(db, minted)
    assert counts["conversations"] == 1
    async with connect(base_url, minted) as ws:
        await ws.send({"type": "feedback", "message_id": answer["started"]["message_id"], "rating": 1})
        await ws.expect("ack")
