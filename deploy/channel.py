"""The deploy notification channel: NOTIFY on a change, LISTEN in every server process.

The registry sends one `NOTIFY flywheel_deploy` inside the same transaction as the row update
(PostgreSQL delivers it on commit, and never for a rolled-back change). The payload says what
happened, for logs; what should serve is always re-read from the database, because a listener
can miss notifications (it was reconnecting, the database restarted) and must still converge.

Server processes use `ServingWatcher(url, on_change)` or `async for state in watch_serving(url)`:
on every (re)connect and every notification the callback gets a fresh `ServingState`; a
connection lost to a database restart is re-established with exponential backoff. Swapping
weights is the callback's business; it should be idempotent (the same state can arrive twice).
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import psycopg
from psycopg import sql

from .settings import DeploySettings
from .state import ServingState, serving_state

log = logging.getLogger(__name__)

CHANNEL = "flywheel_deploy"

# Events a payload's "event" may carry. engine_url: a remote engine endpoint was asked for
# (deploy.endpoints); its payload also carries "engine_url" and "replica".
EVENTS = ("promote", "rollback", "canary", "canary_abort", "retire", "reject", "pin", "unpin",
          "engine_url")


@dataclass(frozen=True)
class Notice:
    """A decoded notification payload: what happened, by whom, and the state it left."""

    event: str  # one of EVENTS
    checkpoint_id: str  # the checkpoint the event is about
    actor: str
    serving_id: str | None
    canary_id: str | None
    canary_percent: float | None
    pinned_id: str | None
    at: str  # ISO 8601, the sender's clock

    @classmethod
    def parse(cls, payload: str) -> Notice:
        data = json.loads(payload)
        return cls(**{name: data.get(name) for name in cls.__dataclass_fields__})


def payload(event: str, checkpoint_id: str, actor: str, state: ServingState,
            extra: dict[str, Any] | None = None) -> str:
    body: dict[str, Any] = {
        **(extra or {}),
        "event": event,
        "checkpoint_id": checkpoint_id,
        "actor": actor,
        "serving_id": state.serving.id if state.serving else None,
        "canary_id": state.canary.id if state.canary else None,
        "canary_percent": state.canary_percent,
        "pinned_id": state.pinned_id,
        "at": datetime.now(UTC).isoformat(),
    }
    # Ids are short; PostgreSQL's 8000-byte payload limit is far away.
    return json.dumps(body, separators=(",", ":"))


def notify(
    conn: psycopg.Connection, event: str, checkpoint_id: str, actor: str, state: ServingState,
    extra: dict[str, Any] | None = None,
) -> None:
    """Queue the notification in the caller's transaction; it is sent when that commits.
    `extra` adds fields to the payload (for logs: listeners re-read the state)."""
    if event not in EVENTS:
        raise ValueError(f"unknown deploy event {event!r}; expected one of {EVENTS}")
    conn.execute("SELECT pg_notify(%s, %s)",
                 (CHANNEL, payload(event, checkpoint_id, actor, state, extra)))


# TCP keepalives notice a dead peer while we sit in LISTEN, where no query would.
_CONNECT_OPTIONS = {
    "connect_timeout": 10, "keepalives": 1, "keepalives_idle": 10, "keepalives_interval": 5,
    "keepalives_count": 3,
}
QUERY_TIMEOUT_S = 15.0

OnChange = Callable[[ServingState], Awaitable[None] | None]


class ServingWatcher:
    """Keeps one LISTEN connection alive and reports what should be serving.

    `on_change(state)` runs (awaited when it is a coroutine function) after every connect and
    reconnect, after every notification, and after a periodic poll that found a change. An
    exception from it is logged and the watcher carries on: a failed swap must not stop the
    replica from hearing about the next promotion.

    Use as `async with ServingWatcher(url, on_change):` (runs in a background task), or
    `await watcher.run()` in a task of your own.
    """

    def __init__(
        self,
        url: str,
        on_change: OnChange | None = None,
        *,
        channel: str = CHANNEL,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 10.0,
        poll_interval_s: float = 30.0,
    ) -> None:
        self.url = url
        self.on_change = on_change
        self.channel = channel
        self.min_backoff_s = min_backoff_s
        self.max_backoff_s = max_backoff_s
        # A safety net, not the mechanism: a quiet connection is also checked this often, so a
        # silently dead socket or a lost notification is noticed within this many seconds.
        self.poll_interval_s = poll_interval_s

        self.state: ServingState | None = None  # the last state read
        self.connected = asyncio.Event()  # set while LISTENing with a fresh state delivered
        self.connects = 0  # successful (re)connections so far, for logs, metrics and tests
        self.backend_pid: int | None = None  # the LISTEN connection's server process
        self._task: asyncio.Task | None = None

    @classmethod
    def from_settings(cls, url: str, on_change: OnChange | None, settings: DeploySettings) -> ServingWatcher:
        return cls(
            url, on_change, min_backoff_s=settings.listen_min_backoff_s,
            max_backoff_s=settings.listen_max_backoff_s, poll_interval_s=settings.listen_poll_s,
        )

    async def states(self) -> AsyncIterator[ServingState]:
        """Yield the serving state on every (re)connect, notification and polled change."""
        backoff = self.min_backoff_s
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(
                    self.url, autocommit=True, **_CONNECT_OPTIONS
                ) as conn:
                    # LISTEN before reading: a change committed in between is then both in the
                    # state we read and in a notification we will get, never in neither.
                    await conn.execute(sql.SQL("LISTEN {}").format(sql.Identifier(self.channel)))
                    self.backend_pid = conn.info.backend_pid
                    self.connects += 1
                    self.state = await self._read(conn)
                    log.info(
                        "listening on %s (connection %d, backend pid %d): serving %s",
                        self.channel, self.connects, self.backend_pid, _describe(self.state),
                    )
                    backoff = self.min_backoff_s
                    yield self.state
                    self.connected.set()  # the consumer has had the fresh state
                    async for state in self._follow(conn):
                        yield state
            except (psycopg.Error, OSError, TimeoutError) as exc:
                # A database restart, a killed backend, a network cut: reconnect after a while.
                self.connected.clear()
                self.backend_pid = None
                wait = backoff * random.uniform(0.8, 1.2)  # jitter: replicas do not stampede
                log.warning(
                    "deploy listener lost its connection (%s); reconnecting in %.1f s",
                    " ".join(str(exc).split()) or type(exc).__name__, wait,
                )
                await asyncio.sleep(wait)
                backoff = min(backoff * 2, self.max_backoff_s)
            finally:
                self.connected.clear()

    async def _follow(self, conn: psycopg.AsyncConnection) -> AsyncIterator[ServingState]:
        while True:
            # notifies() holds the connection while it waits, so collect first, query after.
            # Notifications that arrive meanwhile wait in psycopg's backlog for the next call.
            notices = [
                n async for n in conn.notifies(timeout=self.poll_interval_s, stop_after=1)
            ]
            state = await self._read(conn)
            if notices:
                for notice in notices:
                    log.info("deploy notification: %s", notice.payload)
            elif state == self.state:
                continue  # the periodic check found nothing new
            else:
                log.warning("deploy state changed without a notification: %s", _describe(state))
            self.state = state
            yield state

    async def _read(self, conn: psycopg.AsyncConnection) -> ServingState:
        # Bounded: on a half-open connection a query would otherwise wait for TCP to give up.
        return await asyncio.wait_for(serving_state(conn), QUERY_TIMEOUT_S)

    async def run(self) -> None:
        """Watch until cancelled, calling `on_change` with every state."""
        async for state in self.states():
            if self.on_change is None:
                continue
            try:
                result = self.on_change(state)
                if inspect.isawaitable(result):
                    await result
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the serving-state callback failed for %s", _describe(state))

    def start(self) -> asyncio.Task:
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self.run(), name=f"deploy-watcher-{self.channel}")
        return self._task

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    async def __aenter__(self) -> ServingWatcher:
        self.start()
        return self

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()


def watch_serving(url: str, **options: Any) -> AsyncIterator[ServingState]:
    """`async for state in watch_serving(url):` - see `ServingWatcher` for the options."""
    return ServingWatcher(url, **options).states()


def _describe(state: ServingState | None) -> str:
    if state is None or state.serving is None:
        return "nothing"
    text = state.serving.id
    if state.canary is not None:
        text += f" (canary {state.canary.id} at {state.canary_percent:g}%)"
    for endpoint in state.engine_endpoints:
        text += f"; engine {endpoint.url}" + (f" for {endpoint.replica}" if endpoint.replica else "")
    return text
