"""Edits in the store: an answer rewritten by its user (a demonstration: a sibling written by a
person, plus "the edit beats the original"), a question rewritten (a new branch), refusals."""

from __future__ import annotations

from dataclasses import dataclass

import psycopg
import pytest

from feedback import errors, store, training_data
from feedback.settings import StoreSettings

MODEL = "test-policy-v1"


@dataclass
class World:
    alice: store.User
    bob: store.User
    chat: store.Conversation
    system: store.Message
    question: store.Message
    answer: store.Message


@pytest.fixture
async def world(aconn, new_user) -> World:
    alice, bob = await new_user(), await new_user()
    chat = await store.create_conversation(aconn, alice, "capitals")
    system = await store.add_message(aconn, alice, chat.id, None, "system", "Be brief.")
    question = await store.add_message(aconn, alice, chat.id, system.id, "user", "Capital of France?")
    answer = await store.add_message(
        aconn, alice, chat.id, question.id, "assistant", "It is Paris, I think.", model_version=MODEL
    )
    return World(alice, bob, chat, system, question, answer)


async def test_a_demonstration_is_a_sibling_written_by_the_user_and_beats_the_original(aconn, world):
    demo = await store.record_demonstration(
        aconn, world.alice, str(world.answer.id), "Paris. Have you been?"
    )
    edit = demo.message
    assert demo.original == world.answer
    assert (edit.role, edit.parent_id, edit.conversation_id) == ("assistant", world.question.id, world.chat.id)
    assert (edit.author_id, edit.edited_from, edit.model_version) == (world.alice.id, world.answer.id, None)
    assert edit.content == "Paris. Have you been?"

    cur = await aconn.execute(
        "SELECT message_id, other_id, user_id, verdict FROM comparisons WHERE id = %s",
        (demo.comparison_id,),
    )
    assert await cur.fetchone() == (edit.id, world.answer.id, world.alice.id, "better")

    # In the tree like a regeneration: a sibling of the original, with its authorship.
    assert [m.id for m in await store.siblings(aconn, world.alice, world.answer.id)] == [
        world.answer.id, edit.id
    ]
    tree = await store.conversation_tree(aconn, world.alice, world.chat.id)
    node = next(m for m in tree.messages if m.id == edit.id)
    assert (node.author_id, node.edited_from) == (world.alice.id, world.answer.id)
    original = next(m for m in tree.messages if m.id == world.answer.id)
    assert (original.author_id, original.edited_from) == (None, None)

    # The conversation continues from the edit: it is the context of the next turn.
    follow_up = await store.add_message(aconn, world.alice, world.chat.id, edit.id, "user", "Yes!")
    path = await store.path_to_root(aconn, world.alice, follow_up.id)
    assert [m.id for m in path] == [world.system.id, world.question.id, edit.id, follow_up.id]


async def test_the_scheduler_counts_an_edit_as_one_edit_and_the_users_other_feedback_as_votes(aconn, db_url, world):
    await aconn.commit()
    since = (await (await aconn.execute("SELECT clock_timestamp()")).fetchone())[0]
    await aconn.commit()  # votes are stamped with their transaction's start
    other = await store.add_message(
        aconn, world.alice, world.chat.id, world.question.id, "assistant", "Lyon.", model_version=MODEL
    )
    demo = await store.record_demonstration(aconn, world.alice, world.answer.id, "Paris.")
    await store.record_rating(aconn, world.alice, demo.message.id, 1)  # a vote on the edit
    await store.record_comparison(aconn, world.alice, world.answer.id, other.id, "better")  # a vote
    await aconn.commit()

    def new() -> training_data.NewFeedback:
        with psycopg.connect(db_url) as conn:
            return training_data.feedback_count_since(conn, since)

    # The edit's own "edit beats original" comparison is the edit, not a vote as well.
    assert new() == training_data.NewFeedback(votes=2, edits=1)
    await store.update_conversation(aconn, world.alice, world.chat.id, allow_data_use=False)
    await aconn.commit()
    assert new() == training_data.NewFeedback(votes=0, edits=0)


async def test_an_edit_of_an_edit_points_at_the_edit(aconn, world):
    first = await store.record_demonstration(aconn, world.alice, world.answer.id, "Paris.")
    second = await store.record_demonstration(aconn, world.alice, first.message.id, "Paris!")
    assert second.message.edited_from == first.message.id
    assert second.message.parent_id == world.question.id


async def test_editing_a_question_makes_a_new_branch_and_keeps_the_old(aconn, world):
    edit = await store.edit_question(aconn, world.alice, world.question.id, "Capital of Spain?")
    assert (edit.role, edit.parent_id) == ("user", world.system.id)
    assert (edit.author_id, edit.edited_from) == (world.alice.id, world.question.id)
    branches = await store.siblings(aconn, world.alice, world.question.id)
    assert [m.id for m in branches] == [world.question.id, edit.id]
    # The old branch, with its answer, is still there.
    path = await store.path_to_root(aconn, world.alice, world.answer.id)
    assert [m.id for m in path] == [world.system.id, world.question.id, world.answer.id]
    cur = await aconn.execute("SELECT count(*) FROM comparisons WHERE message_id = %s", (edit.id,))
    assert (await cur.fetchone())[0] == 0  # a question's edit is no preference


TINY = StoreSettings(max_message_chars=40)
REFUSALS = {
    "another user's answer": (errors.NotFound, lambda s, w: store.record_demonstration(
        s, w.bob, w.answer.id, "Paris.")),
    "another user's question": (errors.NotFound, lambda s, w: store.edit_question(
        s, w.bob, w.question.id, "Capital of Spain?")),
    "an unknown id": (errors.NotFound, lambda s, w: store.record_demonstration(
        s, w.alice, "0b8e7f4c-2f1a-4c3e-9a57-6d1f0a3b9c21", "Paris.")),
    "a malformed id": (errors.InvalidId, lambda s, w: store.record_demonstration(
        s, w.alice, "nope", "Paris.")),
    "a question through the answer path": (errors.WrongRole, lambda s, w: store.record_demonstration(
        s, w.alice, w.question.id, "Capital of Spain?")),
    "an answer through the question path": (errors.WrongRole, lambda s, w: store.edit_question(
        s, w.alice, w.answer.id, "Paris.")),
    "the system prompt": (errors.WrongRole, lambda s, w: store.edit_question(
        s, w.alice, w.system.id, "Be long.")),
    "empty content": (errors.EmptyContent, lambda s, w: store.record_demonstration(
        s, w.alice, w.answer.id, "")),
    "whitespace content": (errors.EmptyContent, lambda s, w: store.edit_question(
        s, w.alice, w.question.id, " \n\t")),
    "over-long content": (errors.TooLong, lambda s, w: store.record_demonstration(
        s, w.alice, w.answer.id, "x" * 41, settings=TINY)),
    "a NUL character": (errors.InvalidInput, lambda s, w: store.record_demonstration(
        s, w.alice, w.answer.id, "Par\x00is")),
    "a lone surrogate": (errors.InvalidInput, lambda s, w: store.edit_question(
        s, w.alice, w.question.id, "Capital \ud800?")),
    "content that is not text": (errors.InvalidInput, lambda s, w: store.record_demonstration(
        s, w.alice, w.answer.id, 42)),
    "the same text": (errors.UnchangedEdit, lambda s, w: store.record_demonstration(
        s, w.alice, w.answer.id, "It is Paris, I think.")),
}


@pytest.mark.parametrize("case", list(REFUSALS))
async def test_a_bad_edit_is_refused_with_a_typed_error_and_writes_nothing(case, aconn, world, fingerprint):
    expected, attempt = REFUSALS[case]
    before = await fingerprint(aconn)
    with pytest.raises(expected) as refused:
        await attempt(aconn, world)
    assert await fingerprint(aconn) == before
    assert type(refused.value) is expected
    assert len(refused.value.message) > 20
    if expected is errors.WrongRole:  # says which role it is and which the path takes
        assert refused.value.role in refused.value.message
        assert refused.value.expected in refused.value.message
    assert await store.get_message(aconn, world.alice, world.answer.id) == world.answer


async def test_the_schema_refuses_an_answer_nobody_wrote(aconn, world):
    with pytest.raises(psycopg.errors.CheckViolation):
        async with aconn.transaction():
            await aconn.execute(
                "INSERT INTO messages (conversation_id, parent_id, role, content) VALUES (%s, %s, 'assistant', 'x')",
                (world.chat.id, world.question.id),
            )
    with pytest.raises(psycopg.errors.CheckViolation):
        async with aconn.transaction():
            await aconn.execute(
                """INSERT INTO messages (conversation_id, parent_id, role, content, model_version, edited_from)
                   VALUES (%s, %s, 'assistant', 'x', 'v', %s)""",
                (world.chat.id, world.question.id, world.answer.id),
            )
