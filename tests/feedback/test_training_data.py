"""Retraining's reads on a database of this module's own, so every row read is known here."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import psycopg
import pytest

from feedback import store, training_data

MODEL = "test-policy-v1"


@dataclass
class Chats:
    """Who said what (see `chats` below for the story)."""

    started: datetime
    m: dict[str, store.Message]  # by name
    private_ids: set[uuid.UUID]  # every message of the opted-out conversation


async def _say(conn, user, chat, m: dict, name: str, parent: str | None, role: str, text: str):
    parent_id = m[parent].id if parent else None
    version = MODEL if role == "assistant" else None
    m[name] = await store.add_message(
        conn, user, chat.id, parent_id, role, text, model_version=version
    )


@pytest.fixture(scope="module")
async def chats(own_db_url) -> AsyncIterator[Chats]:
    m: dict[str, store.Message] = {}
    async with await psycopg.AsyncConnection.connect(own_db_url) as conn:
        started = (await (await conn.execute("SELECT now()")).fetchone())[0]
        await conn.commit()
        alice = await store.user_for_token(conn, "alice")
        chat = await store.create_conversation(conn, alice, "sums")
        say = lambda *a: _say(conn, alice, chat, m, *a)  # noqa: E731
        await say("sys", None, "system", "Answer with a number.")
        await say("q1", "sys", "user", "2+2?")
        await say("a1", "q1", "assistant", "4")
        await say("a2", "q1", "assistant", "5")
        await say("a3", "q1", "assistant", "22")
        await say("a4", "q1", "assistant", "4")  # same text as a1
        # 2+2: K=4 answers, three judged pairs and a tie -> one group; a pair with identical
        # texts teaches nothing and is dropped.
        await store.record_comparison(conn, alice, m["a1"].id, m["a2"].id, "better")
        await store.record_comparison(conn, alice, m["a1"].id, m["a3"].id, "better")
        await store.record_comparison(conn, alice, m["a2"].id, m["a3"].id, "worse")  # a3 > a2
        await store.record_comparison(conn, alice, m["a2"].id, m["a4"].id, "same")
        await store.record_comparison(conn, alice, m["a1"].id, m["a4"].id, "better")
        # Thumbs on compared answers: pointwise labels, but not a second (thumb) pair.
        await store.record_rating(conn, alice, m["a1"].id, 1)
        await store.record_rating(conn, alice, m["a2"].id, -1)

        await say("q2", "a1", "user", "3+3?")
        await say("b1", "q2", "assistant", "6")
        await say("b2", "q2", "assistant", "7")
        await say("b3", "q2", "assistant", "six")
        await store.record_rating(conn, alice, m["b1"].id, 1)
        await store.record_rating(conn, alice, m["b2"].id, 1)
        await store.record_rating(conn, alice, m["b2"].id, -1, "wrong")  # changed: net -1
        await store.record_rating(conn, alice, m["b3"].id, 1)

        await say("q3", "b1", "user", "Thanks!")
        await say("c1", "q3", "assistant", "You're welcome.")
        await store.record_rating(conn, alice, m["c1"].id, 1)  # alone: a pointwise label

        # The same exchange again in a second conversation: duplicates of the first.
        again = await store.create_conversation(conn, alice, "sums again")
        say = lambda *a: _say(conn, alice, again, m, *a)  # noqa: E731
        await say("sys'", None, "system", "Answer with a number.")
        await say("q1'", "sys'", "user", "2+2?")
        await say("a1'", "q1'", "assistant", "4")
        await say("a2'", "q1'", "assistant", "5")
        await store.record_comparison(conn, alice, m["a1'"].id, m["a2'"].id, "better")
        await say("q2'", "a1'", "user", "3+3?")
        await say("b1'", "q2'", "assistant", "6")
        await say("b2'", "q2'", "assistant", "7")
        await store.record_rating(conn, alice, m["b1'"].id, 1)
        await store.record_rating(conn, alice, m["b2'"].id, -1)

        # Bob opted out: rich feedback that must never be read.
        bob = await store.user_for_token(conn, "bob")
        private = await store.create_conversation(conn, bob, "private", allow_data_use=False)
        before = set(m)
        say = lambda *a: _say(conn, bob, private, m, *a)  # noqa: E731
        await say("pq", None, "user", "SECRET question")
        await say("pa1", "pq", "assistant", "SECRET answer 1")
        await say("pa2", "pq", "assistant", "SECRET answer 2")
        await say("pa3", "pq", "assistant", "SECRET answer 3")
        await store.record_comparison(conn, bob, m["pa1"].id, m["pa2"].id, "better")
        await store.record_rating(conn, bob, m["pa1"].id, 1)
        await store.record_rating(conn, bob, m["pa3"].id, -1)
        private_ids = {m[name].id for name in set(m) - before}
    yield Chats(started, m, private_ids)


@pytest.fixture
def conn(own_db_url) -> Iterator[psycopg.Connection]:
    with psycopg.connect(own_db_url) as conn:
        yield conn


def turns(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"role": role, "content": content} for role, content in pairs]


def test_comparisons_form_one_group_per_prompt_with_every_judged_pair(conn, chats):
    m = chats.m
    groups = list(training_data.comparison_groups(conn))
    assert len(groups) == 1  # the second conversation's pair duplicates the first's
    group = groups[0]
    assert group.prompt_id == m["q1"].id
    assert group.prompt == turns(("system", "Answer with a number."), ("user", "2+2?"))
    assert group.prompt_ids == [m["sys"].id, m["q1"].id]
    assert [a.id for a in group.answers] == [m["a1"].id, m["a2"].id, m["a3"].id, m["a4"].id]
    assert all(a.model_version == MODEL for a in group.answers)
    assert {(c.content, r.content) for c, r, _ in group.pairs()} == {
        ("4", "5"), ("4", "22"), ("22", "5")
    }
    # The 'same' verdict on a2 and a4 is a tie, in the order it was given.
    assert [(a.id, b.id, p.tie) for a, b, p in group.ties()] == [(m["a2"].id, m["a4"].id, True)]
    assert all(isinstance(p.comparison_id, int) for p in group.preferences)


def test_opposite_thumbs_among_siblings_are_pairs_with_their_prompt(conn, chats):
    m = chats.m
    pairs = list(training_data.thumb_pairs(conn))
    assert {(p.chosen.id, p.rejected.id) for p in pairs} == {
        (m["b1"].id, m["b2"].id), (m["b3"].id, m["b2"].id)
    }
    for pair in pairs:
        assert pair.prompt_id == m["q2"].id
        assert pair.prompt == turns(
            ("system", "Answer with a number."), ("user", "2+2?"), ("assistant", "4"),
            ("user", "3+3?"),
        )
        assert pair.prompt_ids == [m[n].id for n in ("sys", "q1", "a1", "q2")]
        assert len(pair.rating_ids) == 2


def test_every_thumb_is_a_pointwise_label_compared_or_not(conn, chats):
    """Issue 13: a thumb on an answer that is also compared (a1, a2) or in a thumb pair (b1, b2,
    b3) used to be dropped; it says something a comparison cannot (is this answer good at all),
    so every thumbed answer is a label. The second conversation's b1'/b2' repeat b1/b2 (same
    prompt text, answer and sign) and are kept once."""
    m = chats.m
    labels = list(training_data.thumbs(conn))
    assert sorted((s.answer.content, s.label) for s in labels) == sorted(
        [("4", 1), ("5", -1), ("6", 1), ("7", -1), ("six", 1), ("You're welcome.", 1)]
    )
    by_id = {s.answer.id: s for s in labels}
    assert set(by_id) == {m[n].id for n in ("a1", "a2", "b1", "b2", "b3", "c1")}
    assert by_id[m["c1"].id].prompt_ids == [m[n].id for n in ("sys", "q1", "a1", "q2", "b1", "q3")]
    assert by_id[m["c1"].id].prompt[-1] == {"role": "user", "content": "Thanks!"}
    assert len(by_id[m["b2"].id].rating_ids) == 1  # one vote per user and message, changed once


def test_prompts_are_distinct_user_turns_with_their_context(conn, chats):
    m = chats.m
    found = list(training_data.prompts(conn))
    # The second conversation's turns repeat the first's: the earliest of each is kept.
    assert sorted(p.message_id for p in found) == sorted(m[n].id for n in ("q1", "q2", "q3"))
    by_last = {p.messages[-1]["content"]: p for p in found}
    assert by_last["3+3?"].messages == turns(
        ("system", "Answer with a number."), ("user", "2+2?"), ("assistant", "4"),
        ("user", "3+3?"),
    )
    assert len(by_last["3+3?"].message_ids) == 4
    assert len(list(training_data.prompts(conn, limit=2))) == 2


def test_opted_out_conversations_never_appear(conn, chats):
    seen: set[uuid.UUID] = set()
    for group in training_data.comparison_groups(conn):
        seen |= {group.prompt_id, *group.prompt_ids, *(a.id for a in group.answers)}
    for pair in training_data.thumb_pairs(conn):
        seen |= {pair.prompt_id, *pair.prompt_ids, pair.chosen.id, pair.rejected.id}
    for single in training_data.thumbs(conn):
        seen |= {single.prompt_id, *single.prompt_ids, single.answer.id}
    for prompt in training_data.prompts(conn):
        seen |= {prompt.message_id, *prompt.message_ids}
    assert seen and not seen & chats.private_ids


async def test_opting_out_later_removes_a_conversation_from_the_next_read(own_db_url, chats):
    async with await psycopg.AsyncConnection.connect(own_db_url) as aconn:
        carol = await store.user_for_token(aconn, "carol")
        chat = await store.create_conversation(aconn, carol)
        q = await store.add_message(aconn, carol, chat.id, None, "user", "carol asks")
        good = await store.add_message(aconn, carol, chat.id, q.id, "assistant", "yes",
                                       model_version=MODEL)
        bad = await store.add_message(aconn, carol, chat.id, q.id, "assistant", "no",
                                      model_version=MODEL)
        await store.record_rating(aconn, carol, good.id, 1)
        await store.record_rating(aconn, carol, bad.id, -1)

        def carols_pairs() -> int:
            with psycopg.connect(own_db_url) as conn:
                return sum(p.prompt_id == q.id for p in training_data.thumb_pairs(conn))

        assert carols_pairs() == 1
        await store.update_conversation(aconn, carol, chat.id, allow_data_use=False)
        assert carols_pairs() == 0


def test_feedback_since_counts_new_thumbs_and_comparisons_in_usable_conversations(conn, chats):
    # alice: 6 comparisons + 9 thumb calls on 8 answers (b2 twice: one vote, changed);
    # bob's 1 comparison and 2 thumbs are opted out. carol's (other test) are opted out too.
    assert training_data.feedback_count_since(conn, chats.started) == training_data.NewFeedback(votes=6 + 8, edits=0)
    future = datetime.now(timezone.utc) + timedelta(hours=1)
    assert training_data.feedback_count_since(conn, future) == training_data.NewFeedback(votes=0, edits=0)
    with pytest.raises(ValueError):
        training_data.feedback_count_since(conn, datetime.now())


def test_readers_work_on_an_autocommit_connection_too(own_db_url, chats):
    with psycopg.connect(own_db_url, autocommit=True) as conn:
        assert len(list(training_data.comparison_groups(conn))) == 1
