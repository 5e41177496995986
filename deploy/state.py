"""What should be serving right now: the one read every server replica and tool agrees on.

`ServingState` is read from the database (never from a notification's payload), so a replica
that missed a `NOTIFY` catches up on its next read. Both a sync and an async reader share the
same SQL: deploy's commands are sync, the server is async.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
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
        }


def _from_rows(rows: list[tuple]) -> ServingState:
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
    return ServingState(serving, canary, canary_percent, pinned_id)


def read_state(conn: psycopg.Connection) -> ServingState:
    # An explicit row factory: callers' connections may default to dict rows.
    with conn.cursor(row_factory=tuple_row) as cur:
        return _from_rows(cur.execute(STATE_SQL).fetchall())


async def serving_state(conn: psycopg.AsyncConnection) -> ServingState:
    """The async read for server processes (e.g. on a connection from their pool)."""
    async with conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute(STATE_SQL)
        return _from_rows(await cur.fetchall())
