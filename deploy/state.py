"""What should be serving right now: the one read every server replica and tool agrees on.

`ServingState` is read from the database (never from a notification's payload), so a replica
that missed a `NOTIFY` catches up on its next read. Both a sync and an async reader share the
same SQL: deploy's commands are sync, the server is async.

Besides the policies, the state says which URL a remote engine should use (blue/green,
`deploy.endpoints`): the newest request for every replica, and per-replica requests newer
than it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import psycopg
from psycopg.rows import tuple_row

# One row for each of the serving policy and the canary (0, 1 or 2 rows), plus the pin, which
# lives on deploy_state and therefore comes back even when nothing serves yet.
STATE_SQL = """
    SELECT s.pinned_id, c.id, c.path, c.base_model, c.kind, c.parent_id, c.status,
           c.canary_percent
    FROM deploy_state s
    LEFT JOIN checkpoints c ON c.status IN ('serving', 'canary')
"""

# The newest endpoint request per replica (NULL, every replica, is one group of its own).
ENDPOINTS_SQL = """
    SELECT DISTINCT ON (replica) id, replica, url, actor, reason, created_at
    FROM engine_endpoint_events
    WHERE action = 'switch'
    ORDER BY replica, id DESC
"""


@dataclass(frozen=True)
class EngineEndpoint:
    """An operator's request that remote engines send new requests to `url`."""

    id: int  # the request's row: a new request is a new id, even for the same URL
    replica: str | None  # the replica it is for; None: every replica
    url: str
    actor: str
    reason: str | None
    at: datetime  # when it was asked for

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "at": self.at.isoformat()}


@dataclass(frozen=True)
class PolicyRef:
    """What a server needs to load a policy; `id` is the model_version its messages record."""

    id: str
    path: str  # the checkpoint directory (or the base model directory for the base)
    base_model: str  # the base model's name or directory the adapter was trained on
    kind: str  # 'lora' (an adapter on base_model) or 'full' (complete weights)
    parent_id: str | None  # the checkpoint this one was trained from; None for the base


@dataclass(frozen=True)
class ServingState:
    serving: PolicyRef | None  # None only before the base model is registered
    canary: PolicyRef | None = None
    canary_percent: float | None = None  # share of NEW conversations given to the canary, 0-100
    pinned_id: str | None = None  # no automatic promotion while set
    # Remote engine URLs asked for: every replica's (replica None) first, then per-replica
    # requests newer than it. Empty: every replica keeps its ENGINE_URL.
    engine_endpoints: tuple[EngineEndpoint, ...] = ()

    def engine_endpoint(self, replica: str) -> EngineEndpoint | None:
        """The endpoint `replica` should use: the newest request naming it or every replica."""
        mine = [e for e in self.engine_endpoints if e.replica in (None, replica)]
        return max(mine, key=lambda e: e.id, default=None)

    @property
    def live_versions(self) -> tuple[str, ...]:
        """Versions a replica should have loaded: the serving one first, then the canary."""
        return tuple(p.id for p in (self.serving, self.canary) if p is not None)

    def to_json(self) -> dict[str, Any]:
        return {
            "serving": asdict(self.serving) if self.serving else None,
            "canary": asdict(self.canary) if self.canary else None,
            "canary_percent": self.canary_percent,
            "pinned_id": self.pinned_id,
            "engine_endpoints": [e.to_json() for e in self.engine_endpoints],
        }


def _endpoints(rows: list[tuple]) -> tuple[EngineEndpoint, ...]:
    found = [EngineEndpoint(*row) for row in rows]
    every = max((e for e in found if e.replica is None), key=lambda e: e.id, default=None)
    newer = sorted((e for e in found if e.replica is not None and (every is None or e.id > every.id)),
                   key=lambda e: e.id)
    return (every, *newer) if every is not None else tuple(newer)


def _from_rows(rows: list[tuple], endpoint_rows: list[tuple]) -> ServingState:
    if not rows:
        # deploy_state's single row is inserted by migration 0002; without it, not migrated.
        raise RuntimeError("deploy_state is empty: run `python -m feedback migrate`")
    pinned_id = rows[0][0]
    serving = canary = None
    canary_percent = None
    for _, id_, path, base_model, kind, parent_id, status, percent in rows:
        if id_ is None:
            continue
        ref = PolicyRef(id=id_, path=path, base_model=base_model, kind=kind, parent_id=parent_id)
        if status == "serving":
            serving = ref
        else:
            canary, canary_percent = ref, percent
    return ServingState(serving, canary, canary_percent, pinned_id, _endpoints(endpoint_rows))


def read_state(conn: psycopg.Connection) -> ServingState:
    # An explicit row factory: callers' connections may default to dict rows.
    with conn.cursor(row_factory=tuple_row) as cur:
        rows = cur.execute(STATE_SQL).fetchall()
        return _from_rows(rows, cur.execute(ENDPOINTS_SQL).fetchall())


async def serving_state(conn: psycopg.AsyncConnection) -> ServingState:
    """The async read for server processes (e.g. on a connection from their pool)."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(STATE_SQL)
        rows = await cur.fetchall()
        await cur.execute(ENDPOINTS_SQL)
        return _from_rows(rows, await cur.fetchall())
