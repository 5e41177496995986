"""Fixtures for the store's tests: async connections, fresh users, a database of one's own."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator

import psycopg
import pytest
from support.database import scratch_database

from feedback import store

# The tables a refused request must leave untouched, with what would change if one did.
_FINGERPRINT = """
SELECT (SELECT count(*) FROM users),
       (SELECT count(*) FROM conversations), (SELECT max(updated_at) FROM conversations),
       (SELECT count(*) FROM messages),
       (SELECT count(*) FROM ratings), (SELECT max(updated_at) FROM ratings),
       (SELECT count(*) FROM rating_changes),
       (SELECT count(*) FROM comparisons), (SELECT max(updated_at) FROM comparisons)
"""


async def _fingerprint(conn: psycopg.AsyncConnection) -> tuple:
    async with conn.transaction():
        cur = await conn.execute(_FINGERPRINT)
        row = await cur.fetchone()
    assert row is not None
    return tuple(row)


@pytest.fixture
def fingerprint() -> Callable[[psycopg.AsyncConnection], Awaitable[tuple]]:
    """Row counts and last-change times of every table the store writes: equal before and
    after a refused request means nothing was written."""
    return _fingerprint


@pytest.fixture
async def aconn(db_url) -> AsyncIterator[psycopg.AsyncConnection]:
    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        yield conn


@pytest.fixture
def new_user(aconn) -> Callable[[], Awaitable[store.User]]:
    """A factory of users no other test knows (tests share one database)."""

    async def make() -> store.User:
        return await store.user_for_token(aconn, f"test-{uuid.uuid4()}")

    return make


@pytest.fixture(scope="module")
def own_db_url(admin_url) -> Iterator[str]:
    """A migrated database for this module alone, for reads that see every row (training
    data, export) and so must not see other tests' rows."""
    with scratch_database(admin_url, "flywheel_mod") as url:
        yield url
