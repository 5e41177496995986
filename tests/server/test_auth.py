"""server/auth.py: who a request is, from its token, in both modes (ALLOW_ANONYMOUS), against
the real store on PostgreSQL. The HTTP and websocket tests check the same rules end to end;
these pin down each rule where it is made."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator

import psycopg
import pytest
from psycopg_pool import AsyncConnectionPool
from starlette.requests import Request

from feedback.store import hash_token
from server.auth import authenticate, token_from
from server.errors import Unauthorized
from server_testkit import make_settings, new_token


@pytest.fixture
async def pool(db_url) -> AsyncIterator[AsyncConnectionPool]:
    async with AsyncConnectionPool(db_url, min_size=1, max_size=2, open=False) as pool:
        yield pool


def request(headers: dict[str, str] | None = None, query: str = "") -> Request:
    """An HTTP request as Starlette hands it to the app (the websocket handshake reads the same)."""
    raw = [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    return Request({"type": "http", "method": "GET", "path": "/", "headers": raw,
                    "query_string": query.encode()})


async def users_with(db_url: str, token: str) -> int:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        cur = await conn.execute("SELECT count(*) FROM users WHERE token_hash = %s", (hash_token(token),))
        return (await cur.fetchone())[0]


def test_the_token_comes_from_the_bearer_header_or_the_query():
    assert token_from(request({"Authorization": "Bearer abc.def"})) == "abc.def"
    assert token_from(request({"Authorization": "bearer   spaced  "})) == "spaced"  # the scheme is case-blind
    assert token_from(request(query="token=from-query")) == "from-query"
    # The header wins over the query; no token at all is None (the mode decides what that means).
    assert token_from(request({"Authorization": "Bearer header"}, "token=query")) == "header"
    assert token_from(request()) is None and token_from(request(query="token=")) is None


@pytest.mark.parametrize("header", ["Basic dXNlcjpwdw==", "Bearer", "Bearer   ", "Token abc"])
def test_any_other_authorization_header_is_refused_saying_what_to_send(header):
    with pytest.raises(Unauthorized, match="Bearer TOKEN"):
        token_from(request({"Authorization": header}))


async def test_open_mode_registers_a_new_token_and_knows_it_again(pool, db_url, tmp_path):
    settings = make_settings(db_url, tmp_path, allow_anonymous=True)
    token = new_token()
    first = await authenticate(pool, settings, token)
    again = await authenticate(pool, settings, token)
    assert first.user == again.user and first.minted_token is None
    assert await users_with(db_url, token) == 1  # stored once, and only as its hash


async def test_open_mode_mints_an_identity_for_a_request_without_token(pool, db_url, tmp_path):
    settings = make_settings(db_url, tmp_path, allow_anonymous=True)
    minted = await authenticate(pool, settings, None)
    assert minted.minted_token is not None and len(minted.minted_token) >= 32
    back = await authenticate(pool, settings, minted.minted_token)  # the client sends it back
    assert back.user == minted.user and back.minted_token is None
    other = await authenticate(pool, settings, None)
    assert other.user != minted.user  # every tokenless request is a new identity


async def test_open_mode_refuses_a_guessable_new_token_and_stores_nothing(pool, db_url, tmp_path):
    settings = make_settings(db_url, tmp_path, allow_anonymous=True, min_token_chars=24)
    short = uuid.uuid4().hex[:23]
    with pytest.raises(Unauthorized, match="at least 24 characters"):
        await authenticate(pool, settings, short)
    assert await users_with(db_url, short) == 0


async def test_closed_mode_admits_only_tokens_that_exist(pool, db_url, tmp_path):
    known = new_token()
    await authenticate(pool, make_settings(db_url, tmp_path, allow_anonymous=True), known)
    closed = make_settings(db_url, tmp_path, allow_anonymous=False)

    assert (await authenticate(pool, closed, known)).minted_token is None
    stranger = new_token()
    with pytest.raises(Unauthorized, match="unknown token"):
        await authenticate(pool, closed, stranger)
    with pytest.raises(Unauthorized, match="a user token is required"):
        await authenticate(pool, closed, None)
    assert await users_with(db_url, stranger) == 0  # refusing registers no one


async def test_a_known_token_is_admitted_even_when_shorter_than_new_ones_must_be(pool, db_url, tmp_path):
    # MIN_TOKEN_CHARS guards self-chosen tokens; raising it later locks no existing user out.
    token = "x" * 20 + uuid.uuid4().hex[:4]
    await authenticate(pool, make_settings(db_url, tmp_path, allow_anonymous=True, min_token_chars=16), token)
    stricter = make_settings(db_url, tmp_path, allow_anonymous=True, min_token_chars=64)
    assert (await authenticate(pool, stricter, token)).minted_token is None
