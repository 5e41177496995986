"""Helpers for the server's tests: a real uvicorn server in the test loop, settings, and small
websocket / HTTP / database clients. Fixtures live in conftest.py."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import psycopg
import websockets
from support.asgi import serve_asgi

from server.app import create_app
from server.settings import ServerSettings

RECV_TIMEOUT_S = 30


def make_settings(db_url: str, tmp_path, **overrides) -> ServerSettings:
    values: dict[str, Any] = dict(
        data_dir=tmp_path,
        database_url=db_url,
        allow_anonymous=True,
        rate_limit_per_minute=10_000,
        max_concurrent_generations=16,
        default_max_new_tokens=16,
        max_new_tokens_limit=256,
        context_length=1024,
        max_frame_bytes=64 * 1024,
        max_message_chars=20_000,
    )
    values.update(overrides)
    return ServerSettings(_env_file=None, **values)


@asynccontextmanager
async def serve(settings: ServerSettings, engine) -> AsyncIterator[str]:
    """The app on a real uvicorn server on a free port; yields its base URL."""
    async with serve_asgi(create_app(settings, engine=engine), ws_max_size=4 * settings.max_frame_bytes) as url:
        yield url


async def rows(db: psycopg.AsyncConnection, query: str, *args) -> list[dict]:
    cur = await db.execute(query, args)
    return await cur.fetchall()


async def user_row_counts(db: psycopg.AsyncConnection, token: str) -> dict[str, int]:
    """How many rows a user owns in each table (all zeros for a user never seen)."""
    from feedback.store import hash_token

    found = await rows(
        db,
        """SELECT
             (SELECT count(*) FROM conversations c JOIN users u ON u.id = c.user_id
               WHERE u.token_hash = %(h)s) AS conversations,
             (SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
               JOIN users u ON u.id = c.user_id WHERE u.token_hash = %(h)s) AS messages,
             (SELECT count(*) FROM ratings r JOIN users u ON u.id = r.user_id
               WHERE u.token_hash = %(h)s) AS ratings,
             (SELECT count(*) FROM comparisons x JOIN users u ON u.id = x.user_id
               WHERE u.token_hash = %(h)s) AS comparisons""".replace("%(h)s", "%s"),
        *([hash_token(token)] * 4),
    )
    return found[0]


def new_token() -> str:
    """A token no one has used: a new user."""
    return f"test-{uuid.uuid4().hex}"


def ws_url(base_url: str, token: str | None) -> str:
    url = base_url.replace("http://", "ws://") + "/ws"
    return f"{url}?token={token}" if token else url


class Socket:
    """A websocket client speaking the contract's frames."""

    def __init__(self, connection):
        self.connection = connection

    async def send(self, frame: dict | str) -> None:
        await self.connection.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def recv(self, timeout: float = RECV_TIMEOUT_S) -> dict:
        return json.loads(await asyncio.wait_for(self.connection.recv(), timeout))

    async def expect(self, kind: str, timeout: float = RECV_TIMEOUT_S) -> dict:
        frame = await self.recv(timeout)
        assert frame["type"] == kind, f"expected a {kind!r} frame, got {frame}"
        return frame

    async def error(self, frame: dict | str) -> dict:
        """Send a bad frame; returns the error frame it gets."""
        await self.send(frame)
        return await self.expect("error")

    async def answer(self) -> dict:
        """Read one answer to its end: {'started', 'text', 'tokens', 'done'}."""
        started = await self.expect("started")
        return await self.finish(started)

    async def finish(self, started: dict) -> dict:
        pieces = []
        while True:
            frame = await self.recv()
            if frame["type"] == "token":
                assert frame["message_id"] == started["message_id"]
                pieces.append(frame["text"])
            elif frame["type"] == "done":
                assert frame["message_id"] == started["message_id"]
                return {"started": started, "text": "".join(pieces), "tokens": pieces, "done": frame}
            else:
                raise AssertionError(f"unexpected frame while streaming: {frame}")

    async def chat(self, content: str, **fields) -> dict:
        await self.send({"type": "message", "content": content, **fields})
        return await self.answer()


@asynccontextmanager
async def connect(base_url: str, token: str | None, **kwargs) -> AsyncIterator[Socket]:
    async with websockets.connect(ws_url(base_url, token), max_size=None, **kwargs) as conn:
        yield Socket(conn)


@asynccontextmanager
async def http(base_url: str, token: str | None) -> AsyncIterator[httpx.AsyncClient]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=60) as client:
        yield client

