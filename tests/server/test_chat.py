"""One chat turn's answer (server/chat.py) against real PostgreSQL, with a scripted engine
request: how an answer longer than the store takes for answers ends, and what a client is told
when the engine fails."""

from __future__ import annotations

import asyncio
import uuid
from collections import Counter
from types import SimpleNamespace

import pytest
from psycopg_pool import AsyncConnectionPool

from feedback import store
from server.chat import Answer, Chat
from server.engine.base import FinalEvent, SamplingParams, TokenEvent, Usage
from server.quotas import Quotas
from server_testkit import make_settings


class ScriptedRequest:
    """An engine request that streams `pieces` (never minding any limit), like an engine that
    ignores max_new_tokens."""

    model_version = "scripted-v1"

    def __init__(self, pieces: list[str]):
        self.pieces = pieces
        self.cancelled = False

    async def __aiter__(self):
        for i, piece in enumerate(self.pieces, 1):
            if self.cancelled:
                break
            yield TokenEvent(piece, i)
        yield FinalEvent("cancelled" if self.cancelled else "stop", Usage(prompt_tokens=3, completion_tokens=len(self.pieces)))

    def cancel(self) -> None:
        self.cancelled = True


async def asked(pool, title: str, text: str):
    """A new user's question in a new conversation: (user, the question's message)."""
    async with pool.connection() as conn:
        user = await store.user_for_token(conn, f"test-{uuid.uuid4()}")
        conversation = await store.create_conversation(conn, user, title)
        question = await store.add_message(conn, user, conversation.id, None, "user", text)
    return user, question


def answer_to(chat, user, question, request, release=lambda: None) -> Answer:
    return Answer(chat=chat, user=user, conversation_id=question.conversation_id, parent_id=question.id,
                  message_id=uuid.uuid4(), params=SamplingParams(), prompt=SimpleNamespace(n_tokens=3),
                  request=request, release=release)


async def test_an_answer_over_the_answer_limit_is_cut_there_and_stored(db_url, tmp_path):
    settings = make_settings(db_url, tmp_path, max_message_chars=100, max_new_tokens_limit=1,
                             default_max_new_tokens=1)
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False) as pool:
        chat = Chat(pool, None, settings, Quotas(1000, 10))
        limit = chat.answer_settings.max_message_chars
        assert limit == 100, "answers get max(MAX_MESSAGE_CHARS, max_new_tokens_limit x 64 characters)"
        user, question = await asked(pool, "long", "Talk forever.")
        request = ScriptedRequest(["word " * 7] * 10)  # 350 characters
        released = []
        answer = answer_to(chat, user, question, request, release=lambda: released.append(True))
        pieces = [piece async for piece in answer.stream()]

        assert "".join(pieces) == ("word " * 20)[:100] and len(answer.text) == limit
        assert answer.finish_reason == "length" and answer.error is None
        assert request.cancelled, "the engine stops generating"
        assert released
        async with pool.connection() as conn:
            stored = await store.get_message(conn, user, answer.message_id)
        assert stored.content == answer.text and stored.finish_reason == "length"
        assert stored.model_version == "scripted-v1"


async def test_a_nul_the_model_emits_is_dropped_and_the_answer_stored(db_url, tmp_path):
    """A random model emitted a NUL once (the tiny Llama's byte tokens): the answer failed to store."""
    settings = make_settings(db_url, tmp_path)
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False) as pool:
        chat = Chat(pool, None, settings, Quotas(1000, 10))
        user, question = await asked(pool, "nul", "Say something.")
        answer = answer_to(chat, user, question, ScriptedRequest(["Hel\x00lo", "\x00", " there"]))
        pieces = [piece async for piece in answer.stream()]

        assert pieces == ["Hello", " there"] and answer.finish_reason == "stop" and answer.error is None
        async with pool.connection() as conn:
            stored = await store.get_message(conn, user, answer.message_id)
        assert stored.content == "Hello there" and stored.finish_reason == "stop"


class FailingRequest(ScriptedRequest):
    """An engine request that fails after its pieces, with the engine's own account (a remote
    engine's URL and reply, torch's message): what the operator's log needs."""

    DETAIL = ("the remote engine at http://10.1.2.3:8080 refused the request: HTTP 500: "
              "RuntimeError: probability tensor contains either `inf`, `nan` or element < 0")

    async def __aiter__(self):
        for i, piece in enumerate(self.pieces, 1):
            yield TokenEvent(piece, i)
        yield FinalEvent("error", Usage(prompt_tokens=3, completion_tokens=len(self.pieces)), self.DETAIL)


class BrokenRequest(ScriptedRequest):
    """An engine request whose stream raises (an engine breaking its own contract)."""

    async def __aiter__(self):
        yield TokenEvent("partial", 1)
        raise KeyError("internal state 0x7f3a")


async def test_engine_failures_reach_the_client_typed_never_verbatim(db_url, tmp_path, caplog):
    settings = make_settings(db_url, tmp_path)
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False) as pool:
        chat = Chat(pool, None, settings, Quotas(1000, 10))
        user, question = await asked(pool, "fails", "Hi.")
        for request in (FailingRequest(["Hel", "lo"]), BrokenRequest([])):
            answer = answer_to(chat, user, question, request)
            await answer.run()
            assert answer.finish_reason == "error" and answer.text
            assert answer.error.code == "engine_error"
            for secret in ("10.1.2.3", "tensor", "RuntimeError", "KeyError", "0x7f3a"):
                assert secret not in answer.error.message, answer.error.message
            async with pool.connection() as conn:
                stored = await store.get_message(conn, user, answer.message_id)
            assert stored.finish_reason == "error" and stored.content == answer.text
    assert FailingRequest.DETAIL in caplog.text, "the operator's log keeps the engine's account"


async def test_a_refused_start_gives_back_its_slot_and_its_engine_request(db_url, engine, tmp_path, db):
    """Each start_* takes a generation slot, then reads, submits and writes (Chat._starting): a
    refusal before the submit, or after it, leaves the slot free, nothing running in the engine
    and nothing stored."""
    settings = make_settings(db_url, tmp_path)
    quotas = Quotas(1000, 1)  # one slot: a slot kept by a refused start would refuse the next one
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False) as pool:
        chat = Chat(pool, engine, settings, quotas)
        user, question = await asked(pool, "refusals", "Hi.")
        refusals = [
            # Before the submit: a question is not an answer to regenerate, no such question,
            # a messages array the store cannot look up (PostgreSQL takes no NUL).
            (lambda: chat.start_regenerate(user, question.id), 0),
            (lambda: chat.start_edit_question(user, uuid.uuid4(), "an edit of nothing"), 0),
            (lambda: chat.start_from_messages(user, [{"role": "user", "content": "NUL \x00"}], None, None), 0),
            # After the submit: the store refuses to write the user's message.
            (lambda: chat.start_message(user, question.conversation_id, question.id, "a NUL \x00 here"), 1),
        ]
        for refused, submitted in refusals:
            before = engine.stats().finished
            with pytest.raises(Exception):  # noqa: B017 - the kind is each caller's; the state is checked here
                await refused()
            assert quotas.running(user.id) == 0
            for _ in range(500):  # a local engine's cancel reaches its worker a step later
                if engine.in_flight() == 0:
                    break
                await asyncio.sleep(0.01)
            assert engine.in_flight() == 0
            assert engine.stats().finished - before == Counter(cancelled=submitted), "cancelled, not run"
        row = await (await db.execute(
            "SELECT count(DISTINCT c.id) AS conversations, count(m.id) AS messages FROM conversations c "
            "LEFT JOIN messages m ON m.conversation_id = c.id WHERE c.user_id = %s", (user.id,))).fetchone()
        assert row == {"conversations": 1, "messages": 1}, "only what was written before"
        answer = await chat.start_message(user, question.conversation_id, question.id, "And now?")
        assert await answer.run()
