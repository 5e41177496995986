"""A conversation's version (conversations.model_version) through the store: what the server
reads to keep a canary conversation on one policy, and writes when it runs another."""

from __future__ import annotations

import uuid

import pytest

from feedback import errors, store


async def test_a_conversation_has_no_version_until_one_is_set(aconn, new_user):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice, "canary")
    assert await store.conversation_version(aconn, chat.id) is None

    await store.set_conversation_version(aconn, chat.id, "ck-canary")
    assert await store.conversation_version(aconn, str(chat.id)) == "ck-canary"
    await store.set_conversation_version(aconn, chat.id, "ck-serving")  # the canary ended
    assert await store.conversation_version(aconn, chat.id) == "ck-serving"
    # Committed by the call itself: another connection sees it.
    other = await type(aconn).connect(aconn.info.dsn)
    async with other:
        assert await store.conversation_version(other, chat.id) == "ck-serving"


async def test_an_unknown_conversation_has_no_version_and_cannot_get_one(aconn):
    unknown = uuid.uuid4()
    assert await store.conversation_version(aconn, unknown) is None
    with pytest.raises(errors.NotFound):
        await store.set_conversation_version(aconn, unknown, "ck-1")


@pytest.mark.parametrize("version", ["x" * (store.MAX_MODEL_VERSION_CHARS + 1), 7, None])
async def test_a_bad_version_is_refused_and_nothing_changes(aconn, new_user, version):
    alice = await new_user()
    chat = await store.create_conversation(aconn, alice)
    await store.set_conversation_version(aconn, chat.id, "ck-1")
    with pytest.raises(errors.InvalidInput, match="model_version"):
        await store.set_conversation_version(aconn, chat.id, version)
    assert await store.conversation_version(aconn, chat.id) == "ck-1"


async def test_a_malformed_id_is_an_invalid_id(aconn):
    with pytest.raises(errors.InvalidId):
        await store.conversation_version(aconn, "not-a-uuid")
    with pytest.raises(errors.InvalidId):
        await store.set_conversation_version(aconn, "not-a-uuid", "ck-1")
