"""The store API against real PostgreSQL: the tree, feedback, ownership, refusals, concurrency."""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool

from feedback import errors, store
from feedback.settings import StoreSettings

MODEL = "test-policy-v1"


async def answer(conn, user, conversation, parent, content, **kwargs) -> store.Message:
    return await store.add_message(
        conn, user, conversation.id, parent.id, "assistant", content, model_version=MODEL, **kwargs
    )


# -- users ------------------------------------------------------------------------------------


async def test_a_token_is_one_user_and_is_stored_only_hashed(aconn):
    token = f"secret-{uuid.uuid4()}"
    first = await store.user_for_token(aconn, token)
    again = await store.user_for_token(aconn, token)
    other = await store.user_for_token(aconn, token + "x")
    assert first == again and other.id != first.id

    cur = await aconn.execute("SELECT token_hash FROM users WHERE id = %s", (first.id,))
    (stored,) = await cur.fetchone()
    assert bytes(stored) == hashlib.sha256(token.encode()).digest()


async def test_concurrent_first_sight_of_a_token_makes_one_user(db_url):
    token = f"race-{uuid.uuid4()}"
    async with AsyncConnectionPool(db_url, min_size=8, max_size=8, open=False) as pool:

        async def resolve() -> store.User:
            async with pool.connection() as conn:
                return await store.user_for_token(conn, token)

        users = await asyncio.gather(*(resolve() for _ in range(16)))
    assert len({u.id for u in users}) == 1


# -- the message tree -------------------------------------------------------------------------


async def test_a_regeneration_is_a_sibling(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice, "sums")
    question = await store.add_message(aconn, alice, chat.id, None, "user", "2+2?")
    first = await answer(aconn, alice, chat, question, "4", finish_reason="stop",
                         prompt_tokens=5, completion_tokens=1, params={"temperature": 0.2})
    regenerated = await answer(aconn, alice, chat, question, "four")
    follow_up = await store.add_message(aconn, alice, chat.id, first.id, "user", "and 3+3?")

    assert regenerated.parent_id == first.parent_id == question.id
    for message in (first, regenerated):
        found = await store.siblings(aconn, alice, message.id)
        assert [m.id for m in found] == [first.id, regenerated.id]
    assert [m.id for m in await store.siblings(aconn, alice, follow_up.id)] == [follow_up.id]

    stored = await store.get_message(aconn, alice, first.id)
    assert stored == first
    assert (stored.model_version, stored.finish_reason, stored.params) == (
        MODEL, "stop", {"temperature": 0.2}
    )
    assert (stored.prompt_tokens, stored.completion_tokens) == (5, 1)


async def test_path_to_root_runs_root_first_along_one_branch(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice)
    system = await store.add_message(aconn, alice, chat.id, None, "system", "Be brief.")
    q1 = await store.add_message(aconn, alice, chat.id, system.id, "user", "hi")
    a1 = await answer(aconn, alice, chat, q1, "hello")
    await answer(aconn, alice, chat, q1, "hey there")  # another branch: not on the path
    q2 = await store.add_message(aconn, alice, chat.id, a1.id, "user", "how are you?")
    a2 = await answer(aconn, alice, chat, q2, "fine")

    path = await store.path_to_root(aconn, alice, a2.id)
    assert [m.id for m in path] == [system.id, q1.id, a1.id, q2.id, a2.id]
    assert [m.role for m in path] == ["system", "user", "assistant", "user", "assistant"]
    assert [m.id for m in await store.path_to_root(aconn, alice, system.id)] == [system.id]


async def test_find_path_finds_the_longest_stored_prefix_of_the_users_own(aconn, new_user):
    """How the OpenAI API finds where a re-sent messages array lives in the tree."""
    alice, bob = await new_user(), await new_user()
    chat = await store.create_conversation(aconn, alice)
    system = await store.add_message(aconn, alice, chat.id, None, "system", "Be brief.")
    q1 = await store.add_message(aconn, alice, chat.id, system.id, "user", "hi")
    a1 = await answer(aconn, alice, chat, q1, "hello")
    await answer(aconn, alice, chat, q1, "hey there")  # a sibling: another path
    q2 = await store.add_message(aconn, alice, chat.id, a1.id, "user", "how are you?")

    def turns(*pairs):
        return [{"role": role, "content": content} for role, content in pairs]

    asked = turns(("system", "Be brief."), ("user", "hi"), ("assistant", "hello"), ("user", "how are you?"))
    assert await store.find_path(aconn, alice, asked) == [system.id, q1.id, a1.id, q2.id]
    assert await store.find_path(aconn, alice, asked[:3] + turns(("user", "bye"))) == [system.id, q1.id, a1.id]
    branch = asked[:2] + turns(("assistant", "hey there"))
    assert (await store.find_path(aconn, alice, branch))[-1] != a1.id
    assert await store.find_path(aconn, alice, turns(("user", "hi"))) == [], "a path starts at a root"
    assert await store.find_path(aconn, bob, asked) == [], "another user's conversations are never found"
    assert await store.find_path(aconn, alice, []) == []

    # The same opening in two conversations: the most recently active one's path.
    later = await store.create_conversation(aconn, alice)
    root = await store.add_message(aconn, alice, later.id, None, "system", "Be brief.")
    assert await store.find_path(aconn, alice, asked[:1]) == [root.id]
    assert await store.find_path(aconn, alice, asked[:2]) == [system.id, q1.id], "only the first goes on"


async def test_newest_message_is_where_a_turn_without_parent_continues(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice)
    assert await store.newest_message(aconn, alice, chat.id) is None
    q = await store.add_message(aconn, alice, chat.id, None, "user", "hi")
    await answer(aconn, alice, chat, q, "hello")
    regenerated = await answer(aconn, alice, chat, q, "hello again")
    newest = await store.newest_message(aconn, alice, str(chat.id))  # ids may come as strings
    assert newest is not None and newest.id == regenerated.id


async def test_adding_a_message_marks_the_conversation_active(aconn, new_user):
    alice = await new_user()
    older = await store.create_conversation(aconn, alice, "older")
    newer = await store.create_conversation(aconn, alice, "newer")
    assert [c.id for c in await store.list_conversations(aconn, alice)] == [newer.id, older.id]
    await store.add_message(aconn, alice, older.id, None, "user", "back to this one")
    assert [c.id for c in await store.list_conversations(aconn, alice)] == [older.id, newer.id]


async def test_the_server_may_choose_an_answers_id(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice)
    q = await store.add_message(aconn, alice, chat.id, None, "user", "hi")
    announced = uuid.uuid4()  # sent in the 'started' frame before the answer is complete
    stored = await answer(aconn, alice, chat, q, "hello", message_id=str(announced))
    assert stored.id == announced


async def test_conversations_page_newest_first_without_repeats(aconn, new_user):
    alice, bob = await new_user(), await new_user()
    made = [await store.create_conversation(aconn, alice, f"chat {i}") for i in range(5)]
    await store.create_conversation(aconn, bob, "not alice's")

    first = await store.list_conversations(aconn, alice, limit=2)
    second = await store.list_conversations(aconn, alice, limit=2, before=first[-1].id)
    third = await store.list_conversations(aconn, alice, limit=2, before=second[-1].id)
    seen = [c.id for c in first + second + third]
    assert seen == [c.id for c in reversed(made)]


async def test_conversation_tree_has_every_branch_and_the_users_thumbs(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice, "tree", allow_data_use=False)
    q = await store.add_message(aconn, alice, chat.id, None, "user", "hi")
    a1 = await answer(aconn, alice, chat, q, "hello")
    a2 = await answer(aconn, alice, chat, q, "hey")
    await store.record_rating(aconn, alice, a2.id, -1, "too curt")

    tree = await store.conversation_tree(aconn, alice, chat.id)
    assert tree.conversation.title == "tree" and tree.conversation.allow_data_use is False
    assert [(m.id, m.rating, m.rating_reason) for m in tree.messages] == [
        (q.id, None, None), (a1.id, None, None), (a2.id, -1, "too curt")
    ]


async def test_update_conversation_renames_and_opts_out(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice, "draft")
    renamed = await store.update_conversation(aconn, alice, chat.id, title="final")
    assert (renamed.title, renamed.allow_data_use) == ("final", True)
    opted_out = await store.update_conversation(aconn, alice, chat.id, allow_data_use=False)
    assert (opted_out.title, opted_out.allow_data_use) == ("final", False)


# -- feedback ---------------------------------------------------------------------------------


async def test_a_new_thumb_replaces_the_vote_and_keeps_history(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice)
    q = await store.add_message(aconn, alice, chat.id, None, "user", "hi")
    a = await answer(aconn, alice, chat, q, "hello")

    first = await store.record_rating(aconn, alice, a.id, 1)
    second = await store.record_rating(aconn, alice, a.id, -1, "changed my mind")
    assert first == second
    cur = await aconn.execute(
        "SELECT rating, reason FROM ratings WHERE message_id = %s", (a.id,)
    )
    assert await cur.fetchall() == [(-1, "changed my mind")]
    cur = await aconn.execute(
        "SELECT rating FROM rating_changes WHERE rating_id = %s ORDER BY id", (first,)
    )
    assert await cur.fetchall() == [(1,), (-1,)]


async def test_a_new_verdict_on_the_same_pair_replaces_the_old(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice)
    q = await store.add_message(aconn, alice, chat.id, None, "user", "hi")
    a1 = await answer(aconn, alice, chat, q, "hello")
    a2 = await answer(aconn, alice, chat, q, "hey")

    first = await store.record_comparison(aconn, alice, a1.id, a2.id, "better")
    again = await store.record_comparison(aconn, alice, a2.id, a1.id, "better")  # reversed
    assert first == again
    cur = await aconn.execute(
        "SELECT message_id, other_id, verdict FROM comparisons WHERE id = %s", (first,)
    )
    assert await cur.fetchall() == [(a2.id, a1.id, "better")]


async def test_concurrent_thumbs_on_one_answer_leave_one_vote(db_url):
    async with AsyncConnectionPool(db_url, min_size=8, max_size=8, open=False) as pool:
        async with pool.connection() as conn:
            alice = await store.user_for_token(conn, f"test-{uuid.uuid4()}")
            chat = await store.create_conversation(conn, alice)
            q = await store.add_message(conn, alice, chat.id, None, "user", "hi")
            a = await answer(conn, alice, chat, q, "hello")

        async def vote(rating: int) -> int:
            async with pool.connection() as conn:
                return await store.record_rating(conn, alice, a.id, rating)

        ids = await asyncio.gather(*(vote(1 if i % 2 else -1) for i in range(20)))
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*), (SELECT count(*) FROM rating_changes WHERE rating_id = %s) "
                "FROM ratings WHERE message_id = %s",
                (ids[0], a.id),
            )
            assert await cur.fetchone() == (1, 20)
    assert len(set(ids)) == 1


async def test_50_writers_x_100_thumbs_leave_exactly_5000_votes(db_url):
    writers, per_writer = 50, 100
    async with AsyncConnectionPool(db_url, min_size=10, max_size=20, open=False) as pool:
        # Set-up in bulk SQL: this test is about the concurrent writes, not about add_message.
        plan: list[tuple[store.User, list[uuid.UUID]]] = []
        async with pool.connection() as conn:
            for w in range(writers):
                user = await store.user_for_token(conn, f"writer-{w}-{uuid.uuid4()}")
                chat = await store.create_conversation(conn, user, f"writer {w}")
                q = await store.add_message(conn, user, chat.id, None, "user", "say something")
                cur = await conn.execute(
                    """INSERT INTO messages (conversation_id, parent_id, role, content,
                                             model_version)
                       SELECT %s, %s, 'assistant', 'answer ' || g, %s
                       FROM generate_series(1, %s) g RETURNING id""",
                    (chat.id, q.id, MODEL, per_writer),
                )
                plan.append((user, [row[0] for row in await cur.fetchall()]))

        async def writer(user: store.User, answers: list[uuid.UUID]) -> None:
            for i, message_id in enumerate(answers):
                async with pool.connection() as conn:  # as the server does: one per request
                    await store.record_rating(conn, user, message_id, 1 if i % 3 else -1)

        started = time.perf_counter()
        await asyncio.gather(*(writer(user, answers) for user, answers in plan))
        elapsed = time.perf_counter() - started

        user_ids = [user.id for user, _ in plan]
        async with pool.connection() as conn:
            cur = await conn.execute(
                """SELECT count(*), count(DISTINCT (user_id, message_id)),
                          (SELECT count(*) FROM rating_changes h
                           JOIN ratings r ON r.id = h.rating_id WHERE r.user_id = ANY(%s))
                   FROM ratings WHERE user_id = ANY(%s)""",
                (user_ids, user_ids),
            )
            assert await cur.fetchone() == (5000, 5000, 5000)
    print(f"5,000 thumbs from 50 concurrent writers in {elapsed:.2f} s")


# -- refusals: a typed error, and nothing written ---------------------------------------------


@dataclass
class World:
    alice: store.User
    bob: store.User
    chat: store.Conversation  # alice's
    other_chat: store.Conversation  # alice's too
    bobs_chat: store.Conversation
    question: store.Message  # user turn in chat
    a1: store.Message  # two sibling answers to `question`
    a2: store.Message
    follow_up: store.Message  # user turn under a1
    b1: store.Message  # answer to follow_up: not a sibling of a1
    c1: store.Message  # answer in other_chat
    bobs_answer: store.Message
    bobs_other_answer: store.Message


@pytest.fixture(scope="module")
async def world(db_url) -> AsyncIterator[World]:
    # Built once: the refusals below write nothing (that is what they check).
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        yield await _build_world(conn)


async def _build_world(aconn: psycopg.AsyncConnection) -> World:
    alice = await store.user_for_token(aconn, f"alice-{uuid.uuid4()}")
    bob = await store.user_for_token(aconn, f"bob-{uuid.uuid4()}")
    chat = await store.create_conversation(aconn, alice, "alice")
    other_chat = await store.create_conversation(aconn, alice, "alice again")
    bobs_chat = await store.create_conversation(aconn, bob, "bob")
    question = await store.add_message(aconn, alice, chat.id, None, "user", "2+2?")
    a1 = await answer(aconn, alice, chat, question, "4")
    a2 = await answer(aconn, alice, chat, question, "5")
    follow_up = await store.add_message(aconn, alice, chat.id, a1.id, "user", "sure?")
    b1 = await answer(aconn, alice, chat, follow_up, "yes")
    q_other = await store.add_message(aconn, alice, other_chat.id, None, "user", "3+3?")
    c1 = await answer(aconn, alice, other_chat, q_other, "6")
    q_bob = await store.add_message(aconn, bob, bobs_chat.id, None, "user", "hello?")
    bobs_answer = await answer(aconn, bob, bobs_chat, q_bob, "hi bob")
    bobs_other_answer = await answer(aconn, bob, bobs_chat, q_bob, "hello bob")
    # Existing feedback, so a refused change to it would show in the fingerprint too.
    await store.record_rating(aconn, alice, a1.id, 1)
    await store.record_comparison(aconn, alice, a1.id, a2.id, "better")
    return World(alice, bob, chat, other_chat, bobs_chat, question, a1, a2, follow_up, b1, c1,
                 bobs_answer, bobs_other_answer)


LIMITS = StoreSettings()
UNKNOWN = uuid.uuid4()

REFUSALS = {
    # thumbs
    "rating 0": (errors.InvalidRating, lambda s, w: store.record_rating(s, w.alice, w.a1.id, 0)),
    "rating 2": (errors.InvalidRating, lambda s, w: store.record_rating(s, w.alice, w.a1.id, 2)),
    "rating true": (errors.InvalidRating,
                    lambda s, w: store.record_rating(s, w.alice, w.a1.id, True)),
    "rating '1'": (errors.InvalidRating,
                   lambda s, w: store.record_rating(s, w.alice, w.a1.id, "1")),
    "thumb on a user message": (errors.NotAssistant,
                                lambda s, w: store.record_rating(s, w.alice, w.question.id, 1)),
    "thumb on another user's answer": (
        errors.NotFound, lambda s, w: store.record_rating(s, w.alice, w.bobs_answer.id, 1)),
    "thumb on an unknown id": (errors.NotFound,
                               lambda s, w: store.record_rating(s, w.alice, UNKNOWN, 1)),
    "thumb on a malformed id": (errors.InvalidId,
                                lambda s, w: store.record_rating(s, w.alice, "msg-1", 1)),
    "thumb with a non-string id": (errors.InvalidId,
                                   lambda s, w: store.record_rating(s, w.alice, 42, 1)),
    "over-long reason": (errors.TooLong, lambda s, w: store.record_rating(
        s, w.alice, w.a2.id, -1, "x" * (LIMITS.max_reason_chars + 1))),
    # comparisons
    "compared with itself": (errors.SelfComparison, lambda s, w: store.record_comparison(
        s, w.alice, w.a1.id, w.a1.id, "better")),
    "compared with an answer to another prompt": (errors.NotSibling, lambda s, w:
        store.record_comparison(s, w.alice, w.a1.id, w.b1.id, "better")),
    "compared across conversations": (errors.NotSibling, lambda s, w:
        store.record_comparison(s, w.alice, w.a1.id, w.c1.id, "worse")),
    "compared with a user message": (errors.NotAssistant, lambda s, w:
        store.record_comparison(s, w.alice, w.a1.id, w.follow_up.id, "same")),
    "compared with another user's answer": (errors.NotFound, lambda s, w:
        store.record_comparison(s, w.alice, w.a1.id, w.bobs_answer.id, "better")),
    "another user's pair compared": (errors.NotFound, lambda s, w: store.record_comparison(
        s, w.alice, w.bobs_answer.id, w.bobs_other_answer.id, "better")),
    "compared with an unknown id": (errors.NotFound, lambda s, w:
        store.record_comparison(s, w.alice, w.a1.id, UNKNOWN, "better")),
    "compared with a malformed id": (errors.InvalidId, lambda s, w:
        store.record_comparison(s, w.alice, w.a1.id, "nope", "better")),
    "unknown verdict": (errors.InvalidVerdict, lambda s, w:
        store.record_comparison(s, w.alice, w.a1.id, w.a2.id, "best")),
    # reads of another user's data
    "path of another user's message": (errors.NotFound,
        lambda s, w: store.path_to_root(s, w.alice, w.bobs_answer.id)),
    "siblings of another user's message": (errors.NotFound,
        lambda s, w: store.siblings(s, w.alice, w.bobs_answer.id)),
    "another user's message": (errors.NotFound,
        lambda s, w: store.get_message(s, w.alice, w.bobs_answer.id)),
    "another user's conversation": (errors.NotFound,
        lambda s, w: store.get_conversation(s, w.alice, w.bobs_chat.id)),
    "another user's tree": (errors.NotFound,
        lambda s, w: store.conversation_tree(s, w.alice, w.bobs_chat.id)),
    "another user's newest message": (errors.NotFound,
        lambda s, w: store.newest_message(s, w.alice, w.bobs_chat.id)),
    "paging from another user's conversation": (errors.NotFound,
        lambda s, w: store.list_conversations(s, w.alice, before=w.bobs_chat.id)),
    "unknown message's path": (errors.NotFound,
        lambda s, w: store.path_to_root(s, w.alice, UNKNOWN)),
    "unknown message's siblings": (errors.NotFound,
        lambda s, w: store.siblings(s, w.alice, UNKNOWN)),
    "unknown conversation's tree": (errors.NotFound,
        lambda s, w: store.conversation_tree(s, w.alice, UNKNOWN)),
    "malformed conversation id": (errors.InvalidId,
        lambda s, w: store.conversation_tree(s, w.alice, "12345")),
    "malformed message id": (errors.InvalidId,
        lambda s, w: store.path_to_root(s, w.alice, "")),
    "page of 0": (errors.InvalidInput, lambda s, w: store.list_conversations(s, w.alice, 0)),
    # writes into another user's data
    "renaming another user's conversation": (errors.NotFound, lambda s, w:
        store.update_conversation(s, w.alice, w.bobs_chat.id, title="mine now")),
    "opting out another user's conversation": (errors.NotFound, lambda s, w:
        store.update_conversation(s, w.alice, w.bobs_chat.id, allow_data_use=False)),
    "message in another user's conversation": (errors.NotFound, lambda s, w:
        store.add_message(s, w.alice, w.bobs_chat.id, None, "user", "hi")),
    "message under another user's message": (errors.NotFound, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, w.bobs_answer.id, "user", "hi")),
    "parent from another conversation": (errors.WrongConversation, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, w.c1.id, "user", "hi")),
    "message in an unknown conversation": (errors.NotFound, lambda s, w:
        store.add_message(s, w.alice, UNKNOWN, None, "user", "hi")),
    "message under an unknown parent": (errors.NotFound, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, UNKNOWN, "user", "hi")),
    "malformed conversation id for a message": (errors.InvalidId, lambda s, w:
        store.add_message(s, w.alice, "chat-1", None, "user", "hi")),
    "malformed parent id": (errors.InvalidId, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, "parent", "user", "hi")),
    "over-long message": (errors.TooLong, lambda s, w: store.add_message(
        s, w.alice, w.chat.id, w.b1.id, "user", "x" * (LIMITS.max_message_chars + 1))),
    "over-long title": (errors.TooLong, lambda s, w: store.create_conversation(
        s, w.alice, "t" * (LIMITS.max_title_chars + 1))),
    "over-long new title": (errors.TooLong, lambda s, w: store.update_conversation(
        s, w.alice, w.chat.id, title="t" * (LIMITS.max_title_chars + 1))),
    "NUL in content": (errors.InvalidInput, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, w.b1.id, "user", "a\x00b")),
    "lone surrogate in content": (errors.InvalidInput, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, w.b1.id, "user", "a\ud800b")),
    "lone surrogate in a title": (errors.InvalidInput, lambda s, w:
        store.update_conversation(s, w.alice, w.chat.id, title="\udfff")),
    "lone surrogate in a reason": (errors.InvalidInput, lambda s, w:
        store.record_rating(s, w.alice, w.a1.id, 1, "why \ud83d")),
    "NUL in a path looked up": (errors.InvalidInput, lambda s, w:
        store.find_path(s, w.alice, [{"role": "user", "content": "a\x00"}])),
    "unknown role": (errors.InvalidInput, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, w.b1.id, "robot", "beep")),
    "answer without model version": (errors.InvalidInput, lambda s, w:
        store.add_message(s, w.alice, w.chat.id, w.follow_up.id, "assistant", "yes")),
    "unknown finish reason": (errors.InvalidInput, lambda s, w: store.add_message(
        s, w.alice, w.chat.id, w.follow_up.id, "assistant", "yes", model_version=MODEL,
        finish_reason="eos")),
    "negative token count": (errors.InvalidInput, lambda s, w: store.add_message(
        s, w.alice, w.chat.id, w.follow_up.id, "assistant", "yes", model_version=MODEL,
        completion_tokens=-1)),
    "params that are not JSON": (errors.InvalidInput, lambda s, w: store.add_message(
        s, w.alice, w.chat.id, w.follow_up.id, "assistant", "yes", model_version=MODEL,
        params={"temperature": float("nan")})),
    "an id already taken": (errors.AlreadyExists, lambda s, w: store.add_message(
        s, w.alice, w.chat.id, w.follow_up.id, "assistant", "yes", model_version=MODEL,
        message_id=w.a1.id)),
    "empty token": (errors.InvalidToken, lambda s, w: store.user_for_token(s, "")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_bad_input_is_refused_with_a_typed_error_and_writes_nothing(
    case, aconn, world, fingerprint
):
    expected, attempt = REFUSALS[case]
    before = await fingerprint(aconn)
    with pytest.raises(expected) as refused:
        await attempt(aconn, world)
    assert await fingerprint(aconn) == before
    error = refused.value
    assert error.code == expected.code and error.http_status in (400, 401, 404, 409, 413, 422)
    assert len(error.message) > 20 and error.to_wire() == {
        "code": error.code, "message": error.message
    }
    # The connection stays usable after a refusal (the server keeps the socket open).
    assert await store.get_message(aconn, world.alice, world.a1.id) == world.a1


async def test_a_refusal_inside_the_callers_transaction_rolls_back_only_itself(aconn):
    world = await _build_world(aconn)
    async with aconn.transaction():
        await store.record_rating(aconn, world.alice, world.a2.id, -1)
        with pytest.raises(errors.NotAssistant):
            await store.record_rating(aconn, world.alice, world.question.id, -1)
    tree = await store.conversation_tree(aconn, world.alice, world.chat.id)
    assert {m.id: m.rating for m in tree.messages}[world.a2.id] == -1


def test_every_error_has_a_distinct_wire_code():
    classes = [
        c for c in vars(errors).values()
        if isinstance(c, type) and issubclass(c, errors.StoreError)
    ]
    codes = [c.code for c in classes]
    assert len(codes) == len(set(codes))
    assert all(c.http_status in (400, 401, 403, 404, 409, 413, 422) for c in classes)


async def test_a_read_does_not_leave_a_transaction_open(aconn, new_user):
    # Writes are durable when the call returns only if no store call leaves the connection
    # inside an implicit transaction for the next one to be nested in.
    alice = await new_user()
    await store.list_conversations(aconn, alice)
    assert aconn.info.transaction_status == psycopg.pq.TransactionStatus.IDLE
