"""Blue/green for remote engines: which URL the servers' remote engine sends new requests to.

An operator asks (`python -m deploy engine-url URL [--replica NAME]`): one row appended to
`engine_endpoint_events` and one `NOTIFY` on the deploy channel, in one transaction, like a
promotion. Every server with a remote engine hears it (or reads it on its next (re)connect,
as `ServingState.engine_endpoint(replica)`), checks that the URL answers and serves every
version it needs, and only then sends new requests there; streams in flight finish where they
started. Each replica appends what happened ('switched', or 'switch_failed' with the reason,
the old URL serving on), so `python -m deploy engine-url` shows who is where.

The newest request naming a replica or every replica wins: `engine-url GREEN` moves every
replica, including one moved alone before; `engine-url BLUE --replica host:8000` then moves
that one back alone.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

import psycopg
from psycopg.rows import class_row
from psycopg.types.json import Jsonb

from . import channel
from .errors import InvalidEngineUrl, InvalidTransition
from .registry import _jsonable, _lock
from .state import EngineEndpoint, ServingState, read_state

log = logging.getLogger(__name__)

REQUEST, SWITCHED, FAILED = "switch", "switched", "switch_failed"


def check_url(url: str) -> str:
    """`url` stripped, if it is an http(s) URL with a host (the base URL of an engine: with or
    without /v1); InvalidEngineUrl otherwise."""
    url = url.strip()
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidEngineUrl(
            f"{url!r} is not an engine's base URL: give http(s)://HOST[:PORT], such as "
            "http://engine-green:8000 (the URL the servers reach it at)"
        )
    try:
        parts.port  # noqa: B018 - raises on a port that is not a number
    except ValueError as exc:
        raise InvalidEngineUrl(f"{url!r}: {exc}") from None
    return url


@dataclass
class EndpointEvent:
    """A row of `engine_endpoint_events`."""

    id: int
    action: str  # 'switch' (asked for), 'switched' / 'switch_failed' (a replica's outcome)
    replica: str | None
    url: str
    actor: str
    reason: str | None
    request_id: int | None  # the 'switch' row an outcome answers
    details: dict[str, Any]
    created_at: datetime

    COLUMNS = "id, action, replica, url, actor, reason, request_id, details, created_at"

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


def request_switch(
    conn: psycopg.Connection,
    url: str,
    *,
    actor: str,
    reason: str | None = None,
    replica: str | None = None,
) -> tuple[EngineEndpoint, ServingState]:
    """Ask remote engines (of `replica`, default every replica) to use `url` for new requests.

    Always a new request, even for the URL already asked for: that is how replicas that failed
    to switch are asked to try again. Returns the request and the state it leaves.
    """
    url = check_url(url)
    with conn.transaction():
        _lock(conn)
        (request_id,) = conn.execute(
            """INSERT INTO engine_endpoint_events (action, replica, url, actor, reason)
               VALUES (%s, %s, %s, %s, %s) RETURNING id""",
            (REQUEST, replica, url, actor, reason),
        ).fetchone()
        state = read_state(conn)
        serving = state.serving.id if state.serving else ""
        channel.notify(conn, "engine_url", serving, actor, state,
                       {"engine_url": url, "replica": replica, "request_id": request_id})
    endpoint = next(e for e in state.engine_endpoints if e.id == request_id)
    log.info("engine url: %s asked %s to use %s", actor, replica or "every replica", url)
    return endpoint, state


def events(conn: psycopg.Connection, *, limit: int = 50) -> list[EndpointEvent]:
    """Requests and replicas' outcomes, newest first."""
    with conn.cursor(row_factory=class_row(EndpointEvent)) as cur:
        return cur.execute(
            f"SELECT {EndpointEvent.COLUMNS} FROM engine_endpoint_events ORDER BY id DESC LIMIT %s",
            (limit,),
        ).fetchall()


def outcomes(conn: psycopg.Connection, state: ServingState) -> list[EndpointEvent]:
    """Each replica's latest outcome for the requests in force (`state.engine_endpoints`)."""
    request_ids = [e.id for e in state.engine_endpoints]
    with conn.cursor(row_factory=class_row(EndpointEvent)) as cur:
        return cur.execute(
            f"""SELECT DISTINCT ON (request_id, replica) {EndpointEvent.COLUMNS}
                FROM engine_endpoint_events
                WHERE request_id = ANY(%s) AND action IN (%s, %s)
                ORDER BY request_id, replica, id DESC""",
            (request_ids, SWITCHED, FAILED),
        ).fetchall()


async def record_outcome(
    conn: psycopg.AsyncConnection,
    request: EngineEndpoint,
    *,
    replica: str,
    ok: bool,
    error: str | None = None,
    details: dict[str, Any] | None = None,
) -> None:
    """Record that `replica` now sends new requests to `request.url`, or could not (then its
    previous URL serves on and `error` says why)."""
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO engine_endpoint_events (action, replica, url, actor, reason, request_id, details)
               VALUES (%s, %s, %s, %s, %s, %s, %s)""",
            (SWITCHED if ok else FAILED, replica, request.url, replica, error, request.id,
             Jsonb(_jsonable(details or {}))),
        )
