"""Canary serving: a share of NEW conversations gets the candidate, chosen by deploy.canary on
the conversation id; each conversation keeps its version while that version is live, and the
`started` frame reports what actually ran."""

from __future__ import annotations

from collections import Counter

import psycopg
import pytest

from deploy import registry
from deploy.canary import choose_version
from feedback.store import hash_token
from server_testkit import connect, http, new_token
from swap_testkit import (
    ACTOR,
    BASE_ID,
    in_registry,
    own_database,
    register_adapter,
    swap_server,
    version_info,
    wait_for,
    wait_serving,
)

CONVERSATIONS = 40
SHORT = {"max_new_tokens": 2}


@pytest.fixture
def swap_db(admin_url):
    with own_database(admin_url, prefix="flywheel_canary") as url:
        yield url


async def _start_canary(url: str, db_url: str, model_dir, root, checkpoint_id: str) -> dict:
    await wait_serving(url, BASE_ID)
    await register_adapter(db_url, model_dir, root, checkpoint_id, seed=7)
    await in_registry(db_url, lambda c: registry.canary(c, checkpoint_id, 50, actor=ACTOR))

    async def canary_loaded():
        info = await version_info(url)
        return info if info["canary"] == checkpoint_id and info["in_sync"] else None

    return await wait_for(canary_loaded, f"{checkpoint_id} to be served as the canary")


async def _new_conversations(url: str, token: str, count: int) -> dict[str, str]:
    """Start `count` conversations as the user `token`; conversation id -> the model_version
    its first answer ran on (as the `started` frame reports it)."""
    found = {}
    async with connect(url, token) as ws:
        for i in range(count):
            answer = await ws.chat(f"Hello number {i}", params=SHORT)
            assert answer["done"]["finish_reason"] in ("length", "stop")
            found[answer["started"]["conversation_id"]] = answer["started"]["model_version"]
    return found


async def _follow_up(url: str, token: str, conversation_id: str) -> str:
    """The version that answers the next message of a conversation of the user `token`."""
    async with connect(url, token) as ws:
        answer = await ws.chat("And then?", conversation_id=conversation_id, params=SHORT)
        return answer["started"]["model_version"]


async def _regenerate(url: str, db_url: str, token: str, conversation_id: str) -> str:
    """The version that writes another answer to the conversation's first question."""
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT id::text FROM messages WHERE conversation_id = %s AND role = 'assistant' "
            "ORDER BY created_at LIMIT 1",
            (conversation_id,),
        )
        (answer_id,) = await cur.fetchone()
    async with connect(url, token) as ws:
        await ws.send({"type": "regenerate", "message_id": answer_id, "params": SHORT})
        return (await ws.answer())["started"]["model_version"]


async def _assigned(db_url: str, conversation_ids: list[str]) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute(
            "SELECT id::text, model_version FROM conversations WHERE id = ANY(%s::uuid[])",
            (conversation_ids,),
        )
        return dict(await cur.fetchall())


async def test_a_canary_gets_its_share_of_new_conversations_and_each_keeps_its_version(
    swap_db, swap_engine, tiny_model_dir, tmp_path
):
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, _):
        info = await _start_canary(url, swap_db, tiny_model_dir, tmp_path, "lora-c")
        assert info["model_version"] == BASE_ID and info["canary_percent"] == 50
        assert info["versions"] == [BASE_ID, "lora-c"]
        state = await in_registry(swap_db, registry.read_state)

        token = new_token()
        started = await _new_conversations(url, token, CONVERSATIONS)

        counts = Counter(started.values())
        assert set(counts) == {BASE_ID, "lora-c"}, counts
        assert started == {c: choose_version(c, state) for c in started}  # the same on every replica
        assert await _assigned(swap_db, list(started)) == started
        by_version = {v: [c for c, cv in started.items() if cv == v] for v in counts}
        for version, conversations in by_version.items():
            for conversation_id in conversations[:3]:
                assert await _follow_up(url, token, conversation_id) == version
            assert await _regenerate(url, swap_db, token, conversations[0]) == version

        # The share drops to 1% of new conversations; the canary's conversations stay on it.
        await in_registry(swap_db, lambda c: registry.canary(c, "lora-c", 1, actor=ACTOR))
        await wait_for(lambda: _canary_percent(url, 1), "the canary share to drop")
        canary_conversation = by_version["lora-c"][0]
        assert await _follow_up(url, token, canary_conversation) == "lora-c"

        # Aborted: the canary's conversations move to the serving policy on their next message.
        await in_registry(swap_db, lambda c: registry.abort_canary(c, actor=ACTOR))
        await wait_for(lambda: _served(url, [BASE_ID]), "the canary to be unloaded")
        assert await _follow_up(url, token, canary_conversation) == BASE_ID
        assert (await _assigned(swap_db, [canary_conversation]))[canary_conversation] == BASE_ID
        assert set((await _new_conversations(url, token, 5)).values()) == {BASE_ID}


async def test_promoting_the_canary_swaps_without_loading_and_moves_every_conversation(
    swap_db, swap_engine, tiny_model_dir, tmp_path
):
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, _):
        await _start_canary(url, swap_db, tiny_model_dir, tmp_path, "lora-p")
        token = new_token()
        # At 50% each, 12 conversations all went to the canary once in a full run (1 in 4096);
        # with CONVERSATIONS that is 1 in 10^12.
        started = await _new_conversations(url, token, CONVERSATIONS)
        base_conversation = next(c for c, v in started.items() if v == BASE_ID)

        await in_registry(swap_db, lambda c: registry.promote(c, "lora-p", actor=ACTOR))
        info = await wait_serving(url, "lora-p")
        assert info["last_swap"]["load_s"] is None  # it was loaded already, as the canary
        assert info["canary"] is None
        # The base is retired: its conversations continue on the serving policy.
        assert await _follow_up(url, token, base_conversation) == "lora-p"
        await wait_for(lambda: _served(url, ["lora-p"]), "the base version to be unloaded")


async def _api_answer(url: str, token: str, messages: list[dict], **fields) -> dict:
    async with http(url, token) as client:
        response = await client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2, **fields})
        assert response.status_code == 200, response.text
        return response.json()


async def _user_id(db_url: str, token: str) -> int:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute("SELECT id FROM users WHERE token_hash = %s", (hash_token(token),))
        (user_id,) = await cur.fetchone()
        return user_id


async def test_api_clients_follow_the_canary_and_each_sticks_to_one_version(
    swap_db, swap_engine, tiny_model_dir, tmp_path
):
    """`model: "default"` (or none) is the canary decision, made on the API client's user: one
    client gets one version for all its conversations; a named version is what runs."""
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, _):
        await _start_canary(url, swap_db, tiny_model_dir, tmp_path, "lora-api")
        state = await in_registry(swap_db, registry.read_state)

        clients: dict[str, str] = {}  # token -> the version its answers ran on
        for i in range(16):
            token = new_token()
            runs = set()
            for j, fields in enumerate(({"model": "default"}, {}, {"model": "default"})):
                answer = await _api_answer(url, token, [{"role": "user", "content": f"Client {i}, question {j}"}],
                                           **fields)
                runs.add(answer["model"])
            assert len(runs) == 1, f"client {i} saw {runs}"
            clients[token] = runs.pop()
            assert clients[token] == choose_version(f"user:{await _user_id(swap_db, token)}", state)
        assert set(clients.values()) == {BASE_ID, "lora-api"}, Counter(clients.values())

        # A conversation keeps its version: continued over the API and over the websocket.
        token, version = next(iter(clients.items()))
        question = {"role": "user", "content": "Client 0, question 0"}
        first = await _api_answer(url, token, [question])
        conversation_id = await _conversation_of(swap_db, first["id"])
        assert (await _assigned(swap_db, [conversation_id]))[conversation_id] == version
        reply = {"role": "assistant", "content": first["choices"][0]["message"]["content"]}
        second = await _api_answer(url, token, [question, reply, {"role": "user", "content": "And then?"}])
        assert second["model"] == version and await _conversation_of(swap_db, second["id"]) == conversation_id
        assert await _follow_up(url, token, conversation_id) == version

        # A named version runs as asked, whatever the client's share.
        other = BASE_ID if version == "lora-api" else "lora-api"
        named = await _api_answer(url, token, [{"role": "user", "content": "Pinned"}], model=other)
        assert named["model"] == other
        async with http(url, token) as client:
            response = await client.post("/v1/chat/completions", json={
                "model": "no-such-version", "messages": [{"role": "user", "content": "?"}]})
        assert response.status_code == 404 and response.json()["error"]["code"] == "model_not_found"


async def _conversation_of(db_url: str, message_id: str) -> str:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute("SELECT conversation_id::text FROM messages WHERE id = %s", (message_id,))
        (conversation_id,) = await cur.fetchone()
        return conversation_id


async def _canary_percent(url: str, percent: float) -> bool:
    return (await version_info(url))["canary_percent"] == percent


async def _served(url: str, versions: list[str]) -> bool:
    return (await version_info(url))["versions"] == versions
