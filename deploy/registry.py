"""The checkpoint registry: which policies exist, which one serves, which one is in canary.

Every change is one transaction that (1) takes the registry's advisory lock, so two operators
or an operator and the retraining service take turns, (2) updates the `checkpoints` rows,
(3) appends who/when/why to `checkpoint_events`, and (4) sends one `NOTIFY` when what should be
served changed. A reader never sees a half-made change, and servers hear of it only once it is
committed (`_change` is that transaction; each command below is its few lines inside one).
The unique indexes (one serving, one canary) back this up in the database itself.

Functions take a sync psycopg connection; give them an autocommit one (`connect(url)`), or
call them inside a transaction of your own, which then decides when the change commits (the
notification goes out with it).

Automatic promoters (the retraining gate, the canary decision) pass `auto=True`: while the
registry is pinned they are refused with `Pinned`. People (auto=False) may still promote,
roll back or start a canary; the pin then follows to what they chose to serve.
"""

from __future__ import annotations

import getpass
import logging
import socket
from dataclasses import asdict, dataclass, field
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any, ClassVar

import psycopg
from psycopg.rows import class_row, tuple_row
from psycopg.types.json import Jsonb

from . import channel
from .base_model import is_model_dir
from .checkpoint import MANIFEST_NAME, base_model_name, registry_fields, verify
from .errors import (
    AlreadyRegistered, CheckpointError, CheckpointRejected, CheckpointUnusable, InvalidTransition,
    NothingToRollBack, NotRegistered, Pinned, Refused, RegistryError,
)
from .state import PolicyRef, ServingState, read_state, serving_state

log = logging.getLogger(__name__)

# Arbitrary but fixed: every process changing the registry of one database contends on it.
REGISTRY_LOCK_KEY = 0x466C7977_00000002

STATUSES = ("candidate", "canary", "serving", "retired", "rejected")
# Events that made a checkpoint the serving one; rollback replays them (see _rollback_target).
SERVING_ACTIONS = ("promote", "rollback")
# Replica-side events the server records (not state changes): see record_load_result().
LOAD_ACTIONS = ("loaded", "load_failed")

__all__ = [
    "AlreadyRegistered", "Checkpoint", "CheckpointEvent", "CheckpointRejected", "CheckpointUnusable",
    "InvalidTransition", "NotRegistered", "NothingToRollBack", "Pinned", "PolicyRef",
    "RegistryError", "RegistryStatus", "Refused", "ServingState", "Transition", "abort_canary",
    "base_checkpoint_id", "canary", "connect", "default_actor", "events", "get", "list_checkpoints",
    "pin", "promote", "read_state", "record_load_result", "register", "register_base",
    "register_fields", "reject", "retire", "rollback", "serving_state", "status", "unpin",
    "verify_files",
]


# ---------------------------------------------------------------------------------------------
# What the registry returns.


@dataclass
class Checkpoint:
    """A row of `checkpoints`."""

    id: str
    parent_id: str | None
    path: str
    base_model: str
    kind: str  # 'lora' | 'full'
    status: str  # one of STATUSES
    canary_percent: float | None
    metrics: dict[str, Any]
    config: dict[str, Any]
    created_at: datetime
    promoted_at: datetime | None  # when it last became the serving policy
    promoted_by: str | None
    reason: str | None  # why its status last changed

    COLUMNS: ClassVar[str] = (
        "id, parent_id, path, base_model, kind, status, canary_percent, metrics, config, "
        "created_at, promoted_at, promoted_by, reason"
    )

    @property
    def is_base(self) -> bool:
        return bool(self.config.get("base"))

    def ref(self) -> PolicyRef:
        return PolicyRef(self.id, self.path, self.base_model, self.kind, self.parent_id)

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass
class CheckpointEvent:
    """A row of `checkpoint_events`: who did what to which checkpoint, when and why."""

    id: int
    checkpoint_id: str
    action: str
    actor: str
    reason: str | None
    details: dict[str, Any]
    created_at: datetime

    def to_json(self) -> dict[str, Any]:
        return _jsonable(asdict(self))


@dataclass
class Transition:
    """The outcome of one registry command."""

    action: str
    checkpoint_id: str
    changed: bool  # False: it was already so (nothing written, no notification)
    state: ServingState  # what should serve afterwards
    previous_id: str | None = None  # what served (or was in canary) before, where relevant
    details: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "action": self.action,
            "checkpoint_id": self.checkpoint_id,
            "changed": self.changed,
            "previous_id": self.previous_id,
            "details": _jsonable(self.details),
            "state": self.state.to_json(),
        }


@dataclass
class RegistryStatus:
    state: ServingState
    serving: Checkpoint | None
    canary: Checkpoint | None
    pinned_by: str | None
    pinned_at: datetime | None
    pin_reason: str | None
    candidates: int  # registered and not yet decided
    recent_events: list[CheckpointEvent]
    load_failures: list[CheckpointEvent]  # replicas that failed to load a live version

    def to_json(self) -> dict[str, Any]:
        return {
            "serving": self.serving.to_json() if self.serving else None,
            "canary": self.canary.to_json() if self.canary else None,
            "canary_percent": self.state.canary_percent,
            "pinned": (
                {"checkpoint_id": self.state.pinned_id, "by": self.pinned_by,
                 "at": _jsonable(self.pinned_at), "reason": self.pin_reason}
                if self.state.pinned_id else None
            ),
            "candidates": self.candidates,
            "recent_events": [e.to_json() for e in self.recent_events],
            "load_failures": [e.to_json() for e in self.load_failures],
        }


def _jsonable(value: Any) -> Any:
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------------------------
# Small helpers.


def connect(url: str) -> psycopg.Connection:
    """An autocommit connection: every registry call is then its own transaction."""
    return psycopg.connect(url, autocommit=True)


def default_actor() -> str:
    """`$USER@hostname`, what the deploy script records when --actor is not given."""
    try:
        user = getpass.getuser()
    except Exception:  # no USER and no passwd entry (some containers)
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def base_checkpoint_id(base_model_dir: str | Path) -> str:
    """The checkpoint id (= model_version) of a base model directory: its manifest id (the
    converted default), else its directory name. The same name `load_base_policy` serves under
    and LoRA manifests give as their base_model."""
    return base_model_name(Path(base_model_dir))


def _select(conn: psycopg.Connection, query: str, params: Any = None) -> psycopg.Cursor:
    """A query whose rows are read as tuples, whatever row factory the caller's connection has."""
    return conn.cursor(row_factory=tuple_row).execute(query, params)


def _lock(conn: psycopg.Connection) -> None:
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (REGISTRY_LOCK_KEY,))


def _fetch(conn: psycopg.Connection, checkpoint_id: str, *, for_update: bool = False) -> Checkpoint:
    query = f"SELECT {Checkpoint.COLUMNS} FROM checkpoints WHERE id = %s"
    if for_update:
        query += " FOR UPDATE"
    with conn.cursor(row_factory=class_row(Checkpoint)) as cur:
        row = cur.execute(query, (checkpoint_id,)).fetchone()
    if row is None:
        raise NotRegistered(checkpoint_id)
    return row


def _record(
    conn: psycopg.Connection,
    checkpoint_id: str,
    action: str,
    actor: str,
    reason: str | None,
    details: dict[str, Any] | None = None,
) -> None:
    conn.execute(
        """INSERT INTO checkpoint_events (checkpoint_id, action, actor, reason, details)
           VALUES (%s, %s, %s, %s, %s)""",
        (checkpoint_id, action, actor, reason, Jsonb(_jsonable(details or {}))),
    )


def _set_status(
    conn: psycopg.Connection,
    checkpoint_id: str,
    status: str,
    reason: str | None,
    *,
    canary_percent: float | None = None,
    promoted_by: str | None = None,
) -> None:
    if promoted_by is not None:
        conn.execute(
            """UPDATE checkpoints SET status = %s, canary_percent = %s, reason = %s,
                      promoted_at = now(), promoted_by = %s
               WHERE id = %s""",
            (status, canary_percent, reason, promoted_by, checkpoint_id),
        )
    else:
        conn.execute(
            "UPDATE checkpoints SET status = %s, canary_percent = %s, reason = %s WHERE id = %s",
            (status, canary_percent, reason, checkpoint_id),
        )


def _notify_if_changed(
    conn: psycopg.Connection, before: ServingState, event: str, checkpoint_id: str, actor: str
) -> ServingState:
    """One NOTIFY per command, and only when what should serve (or the pin) changed."""
    after = read_state(conn)
    if after != before:
        channel.notify(conn, event, checkpoint_id, actor, after)
    return after


def _pin_row(conn: psycopg.Connection) -> tuple[str | None, str | None, datetime | None, str | None]:
    row = _select(conn, "SELECT pinned_id, pinned_by, pinned_at, pin_reason FROM deploy_state").fetchone()
    if row is None:
        raise RegistryError("deploy_state is empty: run `python -m feedback migrate`")
    return tuple(row)  # type: ignore[return-value]


def _refuse_if_pinned(conn: psycopg.Connection, what: str) -> None:
    pinned_id, pinned_by, _, reason = _pin_row(conn)
    if pinned_id is not None:
        raise Pinned(pinned_id, pinned_by, reason, what)


# ---------------------------------------------------------------------------------------------
# Checkpoint files: verified through deploy.checkpoint.


def verify_files(ref: PolicyRef) -> None:
    """Refuse (CheckpointUnusable) a policy whose files are missing or altered, before any
    weight is read: the registry before it changes what serves, each server before it loads.

    Checkpoints are verified against their manifest's sha256s. The base model (complete weights
    trained from nothing) may be a directory named by MODEL with no manifest (nothing wrote
    one); it must at least look loadable.
    """
    path = Path(ref.path)
    if ref.kind == "full" and ref.parent_id is None and not (path / MANIFEST_NAME).exists():
        if not is_model_dir(path):
            raise CheckpointUnusable(
                ref.id, ref.path,
                f"the base model directory {path} is missing or lacks config.json and weights "
                "(restore it, or start a server with MODEL set to it to re-register it)",
            )
        return
    try:
        verify(path)
    except CheckpointError as exc:
        raise CheckpointUnusable(ref.id, ref.path, str(exc)) from exc


# ---------------------------------------------------------------------------------------------
# Reading.


def get(conn: psycopg.Connection, checkpoint_id: str) -> Checkpoint:
    return _fetch(conn, checkpoint_id)


def list_checkpoints(
    conn: psycopg.Connection, *, status: str | None = None, limit: int | None = None
) -> list[Checkpoint]:
    """Newest first; the serving and canary ones first of all."""
    if status is not None and status not in STATUSES:
        raise RegistryError(f"unknown status {status!r}: expected one of {', '.join(STATUSES)}")
    query = f"""SELECT {Checkpoint.COLUMNS} FROM checkpoints
                WHERE %(status)s::text IS NULL OR status = %(status)s
                ORDER BY status = 'serving' DESC, status = 'canary' DESC, created_at DESC, id
                LIMIT %(limit)s"""
    with conn.cursor(row_factory=class_row(Checkpoint)) as cur:
        return cur.execute(query, {"status": status, "limit": limit}).fetchall()


def events(
    conn: psycopg.Connection, checkpoint_id: str | None = None, *, limit: int = 50
) -> list[CheckpointEvent]:
    """Newest first."""
    with conn.cursor(row_factory=class_row(CheckpointEvent)) as cur:
        return cur.execute(
            """SELECT id, checkpoint_id, action, actor, reason, details, created_at
               FROM checkpoint_events
               WHERE %(id)s::text IS NULL OR checkpoint_id = %(id)s
               ORDER BY id DESC LIMIT %(limit)s""",
            {"id": checkpoint_id, "limit": limit},
        ).fetchall()


def status(conn: psycopg.Connection, *, recent: int = 10) -> RegistryStatus:
    with conn.transaction():  # one snapshot for all the reads below
        state = read_state(conn)
        serving = _fetch(conn, state.serving.id) if state.serving else None
        canary_ck = _fetch(conn, state.canary.id) if state.canary else None
        _, pinned_by, pinned_at, pin_reason = _pin_row(conn)
        (candidates,) = _select(
            conn, "SELECT count(*) FROM checkpoints WHERE status = 'candidate'"
        ).fetchone()
        with conn.cursor(row_factory=class_row(CheckpointEvent)) as cur:
            failures = cur.execute(
                """SELECT id, checkpoint_id, action, actor, reason, details, created_at
                   FROM checkpoint_events
                   WHERE action = 'load_failed' AND checkpoint_id = ANY(%s)
                   ORDER BY id DESC LIMIT 20""",
                (list(state.live_versions),),
            ).fetchall()
        recent_events = events(conn, limit=recent)
    return RegistryStatus(
        state, serving, canary_ck, pinned_by, pinned_at, pin_reason, candidates, recent_events,
        failures,
    )


# ---------------------------------------------------------------------------------------------
# Registering.


def register(
    conn: psycopg.Connection,
    path: str | Path,
    *,
    actor: str,
    reason: str | None = None,
    status: str = "candidate",
    metrics: dict[str, Any] | None = None,
) -> Checkpoint:
    """Register the checkpoint directory at `path` from its manifest (verified first).

    `status` is 'candidate' (the gate passed, or no gate) or 'rejected' (the gate failed:
    give the reason; the numbers go in `metrics`, merged over the manifest's). Registering the
    same id and path again returns the existing row unchanged (a retried round is harmless).
    """
    _check_registration(status, reason)
    path = Path(path).resolve()
    try:
        manifest = verify(path)
    except CheckpointError as exc:
        raise CheckpointUnusable(exc.checkpoint_id or path.name, str(path), str(exc)) from exc
    fields = registry_fields(manifest)
    # The manifest's numbers, the data counts beside them, and the caller's on top (the gate's).
    merged_metrics = {**(fields.get("metrics") or {}), **(metrics or {})}
    if fields.get("data_counts"):
        merged_metrics.setdefault("data_counts", fields["data_counts"])
    return register_fields(
        conn,
        checkpoint_id=fields["id"],
        path=str(path),
        base_model=fields["base_model"],
        kind=fields["kind"],
        parent_id=fields.get("parent_id"),
        config=fields.get("config") or {},
        metrics=merged_metrics,
        actor=actor,
        reason=reason,
        status=status,
    )


def _check_registration(status: str, reason: str | None) -> None:
    if status not in ("candidate", "rejected"):
        raise InvalidTransition(
            f"a checkpoint is registered as 'candidate' or 'rejected', not {status!r}: "
            "promote or canary it afterwards"
        )
    if status == "rejected" and not reason:
        raise InvalidTransition("registering a rejected checkpoint needs the reason it failed")


def register_fields(
    conn: psycopg.Connection,
    *,
    checkpoint_id: str,
    path: str,
    base_model: str,
    kind: str,
    actor: str,
    parent_id: str | None = None,
    config: dict[str, Any] | None = None,
    metrics: dict[str, Any] | None = None,
    reason: str | None = None,
    status: str = "candidate",
) -> Checkpoint:
    """Register from fields (no manifest read): `register` and `register_base` end here."""
    _check_registration(status, reason)
    if kind not in ("lora", "full"):
        raise InvalidTransition(f"kind must be 'lora' or 'full', not {kind!r}")
    with conn.transaction():
        _lock(conn)
        existing = _select(
            conn, "SELECT path, status FROM checkpoints WHERE id = %s", (checkpoint_id,)
        ).fetchone()
        if existing is not None:
            if existing[0] == path:
                return _fetch(conn, checkpoint_id)
            raise AlreadyRegistered(
                f"checkpoint id {checkpoint_id} is already registered for {existing[0]} "
                f"(status {existing[1]}), not {path}: checkpoint ids are unique, write the new "
                "one under a fresh id"
            )
        if parent_id is not None and _select(
            conn, "SELECT 1 FROM checkpoints WHERE id = %s", (parent_id,)
        ).fetchone() is None:
            raise NotRegistered(
                parent_id, f"register the parent of {checkpoint_id} first (it was trained from it)"
            )
        conn.execute(
            """INSERT INTO checkpoints
                   (id, parent_id, path, base_model, kind, status, metrics, config, reason)
               VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s)""",
            (checkpoint_id, parent_id, path, base_model, kind, status,
             Jsonb(_jsonable(metrics or {})), Jsonb(_jsonable(config or {})), reason),
        )
        _record(conn, checkpoint_id, "register", actor, reason, {"status": status, "path": path})
        if status == "rejected":
            _record(conn, checkpoint_id, "reject", actor, reason, {"metrics": metrics or {}})
        log.info("registered %s (%s, %s) from %s", checkpoint_id, kind, status, path)
        return _fetch(conn, checkpoint_id)


def register_base(
    conn: psycopg.Connection,
    base_model_dir: str | Path,
    *,
    actor: str,
    checkpoint_id: str | None = None,
) -> Checkpoint:
    """Register the base model directory (idempotent); it serves when nothing serves yet.

    Every server calls this at start, so a fresh database serves the base model and its
    messages carry a model_version from the first answer on. The id defaults to
    `base_checkpoint_id(base_model_dir)`.
    """
    path = str(Path(base_model_dir).resolve())
    checkpoint_id = checkpoint_id or base_checkpoint_id(path)
    with _change(conn, "promote", actor) as change:
        existing = _select(
            conn, "SELECT path FROM checkpoints WHERE id = %s", (checkpoint_id,)
        ).fetchone()
        if existing is None:
            register_fields(
                conn, checkpoint_id=checkpoint_id, path=path, base_model=checkpoint_id, kind="full",
                actor=actor, config={"base": True}, reason="base model",
            )
        elif existing[0] != path and not Path(existing[0]).exists() and Path(path).exists():
            # DATA_DIR moved (or a new machine): rollback and retraining read this path.
            conn.execute("UPDATE checkpoints SET path = %s WHERE id = %s", (path, checkpoint_id))
            change.record(checkpoint_id, "the recorded directory is gone",
                          {"from": existing[0], "to": path}, action="relocate")
        if change.before.serving is None:
            _make_serving(change, change.fetch(checkpoint_id), "the first policy: the base model",
                          auto=False, details={"initial": True})
            change.notify(checkpoint_id)
        return _fetch(conn, checkpoint_id)


# ---------------------------------------------------------------------------------------------
# Changing what serves. Each change below is one `_change`: a transaction that holds the
# registry's lock, reads the state before, records what it did and notifies once at the end.


@dataclass
class _Change:
    """One registry change in progress (see `_change`)."""

    conn: psycopg.Connection
    event: str  # the Transition's action, the NOTIFY's event and the default event action
    actor: str
    before: ServingState  # read under the lock, so nothing else changes it meanwhile

    def fetch(self, checkpoint_id: str) -> Checkpoint:
        """The row, locked until the change commits."""
        return _fetch(self.conn, checkpoint_id, for_update=True)

    def record(self, checkpoint_id: str, reason: str | None, details: dict[str, Any] | None = None,
               *, action: str | None = None) -> None:
        _record(self.conn, checkpoint_id, action or self.event, self.actor, reason, details)

    def notify(self, checkpoint_id: str) -> ServingState:
        """The state after the change; one NOTIFY if what should serve (or the pin) changed."""
        return _notify_if_changed(self.conn, self.before, self.event, checkpoint_id, self.actor)

    def unchanged(self, checkpoint_id: str, previous_id: str | None = None) -> Transition:
        """It was already so: nothing written, nobody notified."""
        return Transition(self.event, checkpoint_id, False, self.before, previous_id)

    def changed(self, checkpoint_id: str, previous_id: str | None = None,
                details: dict[str, Any] | None = None) -> Transition:
        return Transition(self.event, checkpoint_id, True, self.notify(checkpoint_id), previous_id,
                          details or {})

    @property
    def current_id(self) -> str:
        """What serves before the change ('' when nothing does yet)."""
        return self.before.serving.id if self.before.serving else ""


@contextmanager
def _change(conn: psycopg.Connection, event: str, actor: str) -> Iterator[_Change]:
    """A transaction holding the registry's advisory lock, with the serving state read under it.

    The body records and notifies through the `_Change`; any error rolls all of it back, and
    the NOTIFY goes out only when the transaction commits (PostgreSQL holds it until then).
    """
    with conn.transaction():
        _lock(conn)
        yield _Change(conn, event, actor, read_state(conn))


def _make_serving(
    change: _Change,
    target: Checkpoint,
    reason: str | None,
    *,
    auto: bool,
    action: str | None = None,
    details: dict[str, Any] | None = None,
) -> Transition:
    """Old serving -> retired, target -> serving, events for both; no NOTIFY (the caller's)."""
    conn, before, actor, action = change.conn, change.before, change.actor, action or change.event
    previous = before.serving.id if before.serving else None
    if previous == target.id:
        return Transition(action, target.id, False, before, previous)
    if target.status == "rejected":
        raise CheckpointRejected(target)
    pinned_id, pinned_by, _, pin_reason = _pin_row(conn)
    if pinned_id is not None and auto:
        raise Pinned(pinned_id, pinned_by, pin_reason, f"automatic {action} of {target.id}")
    event_details = {"previous": previous, "from_status": target.status, "auto": auto,
                     **(details or {})}
    if previous is not None:
        _set_status(conn, previous, "retired", f"replaced by {target.id} ({action})")
        change.record(previous, reason, {"replaced_by": target.id, "via": action}, action="retire")
    _set_status(conn, target.id, "serving", reason, promoted_by=actor)
    if pinned_id is not None:
        # A person chose what serves now; the pin (no automatic changes) stays, on the new one.
        conn.execute("UPDATE deploy_state SET pinned_id = %s", (target.id,))
        event_details["pin_moved_from"] = pinned_id
    change.record(target.id, reason, event_details, action=action)
    log.info("%s: %s now serves (was %s), by %s", action, target.id, previous, actor)
    return Transition(action, target.id, True, before, previous, event_details)


def promote(
    conn: psycopg.Connection,
    checkpoint_id: str,
    *,
    actor: str,
    reason: str | None = None,
    auto: bool = False,
) -> Transition:
    """Make `checkpoint_id` the serving policy (a canary, a candidate, or a retired one).

    Refused: unknown id, rejected, files missing or corrupt, and (auto=True) while pinned or
    for anything but a candidate or the canary.
    """
    target = _fetch(conn, checkpoint_id)
    if auto and target.status != "serving":
        _refuse_if_pinned(conn, f"automatic promotion of {checkpoint_id}")
    _check_promotable(target, auto)
    if target.status != "serving":
        verify_files(target.ref())  # before taking the lock: hashing a full model takes a while
    with _change(conn, "promote", actor) as change:
        target = change.fetch(checkpoint_id)
        _check_promotable(target, auto)  # again: it may have changed while we verified
        result = _make_serving(change, target, reason, auto=auto)
        result.state = change.notify(checkpoint_id)
        return result


def _check_promotable(target: Checkpoint, auto: bool) -> None:
    if target.status == "rejected":
        raise CheckpointRejected(target)
    if auto and target.status not in ("candidate", "canary", "serving"):
        raise InvalidTransition(
            f"automatic promotion takes a candidate or the canary; {target.id} is {target.status}: "
            "a person can promote it (`python -m deploy promote ID`)"
        )


def _rollback_target(conn: psycopg.Connection, current: str) -> Checkpoint:
    """The checkpoint that served before `current`, from the history of serving changes.

    Replays promote/rollback events as a stack: a promote pushes, a rollback pops back to its
    target. So rolling back twice goes two steps back, never back and forth between two.
    Rejected checkpoints are skipped.
    """
    rows = _select(
        conn,
        "SELECT checkpoint_id, action FROM checkpoint_events WHERE action = ANY(%s) ORDER BY id",
        (list(SERVING_ACTIONS),),
    ).fetchall()
    stack: list[str] = []
    for checkpoint_id, action in rows:
        if action == "rollback":
            while stack and stack[-1] != checkpoint_id:
                stack.pop()
            if not stack:
                stack.append(checkpoint_id)
        elif not stack or stack[-1] != checkpoint_id:
            stack.append(checkpoint_id)
    for checkpoint_id in reversed(stack):
        if checkpoint_id == current:
            continue
        candidate = _fetch(conn, checkpoint_id, for_update=True)
        if candidate.status != "rejected":
            return candidate
    raise NothingToRollBack(
        f"{current} is the first policy that served: there is nothing before it to roll back "
        "to. Promote a specific checkpoint instead (`python -m deploy list`)"
    )


def rollback(
    conn: psycopg.Connection, *, actor: str, reason: str | None = None, auto: bool = False
) -> Transition:
    """Serve the checkpoint that served before the current one again."""
    with _change(conn, "rollback", actor) as change:
        if auto:
            _refuse_if_pinned(conn, "automatic rollback")
        if change.before.serving is None:
            raise NothingToRollBack("nothing serves yet: start a server (it registers the base model)")
        target = _rollback_target(conn, change.current_id)
        # Verified under the lock (the target is only known here); a rollback target has
        # served before, so this is normally a small adapter or the base model directory.
        verify_files(target.ref())
        result = _make_serving(change, target, reason, auto=auto)
        result.state = change.notify(target.id)
        return result


def pin(
    conn: psycopg.Connection,
    checkpoint_id: str | None = None,
    *,
    actor: str,
    reason: str | None = None,
) -> Transition:
    """Serve `checkpoint_id` (default: the serving one) and stop automatic changes."""
    if checkpoint_id is not None:
        target = _fetch(conn, checkpoint_id)
        _check_promotable(target, auto=False)
        if target.status != "serving":
            verify_files(target.ref())
    with _change(conn, "pin", actor) as change:
        if checkpoint_id is None:
            if change.before.serving is None:
                raise InvalidTransition("nothing serves yet, so there is nothing to pin")
            checkpoint_id = change.current_id
        promoted = _make_serving(change, change.fetch(checkpoint_id), reason, auto=False,
                                 action="promote", details={"for_pin": True})
        pinned_id = _pin_row(conn)[0]
        if pinned_id == checkpoint_id and not promoted.changed:
            return change.unchanged(checkpoint_id, pinned_id)
        conn.execute(
            """UPDATE deploy_state
               SET pinned_id = %s, pinned_by = %s, pinned_at = now(), pin_reason = %s""",
            (checkpoint_id, actor, reason),
        )
        change.record(checkpoint_id, reason,
                      {"previous_pin": change.before.pinned_id, "promoted": promoted.changed})
        return change.changed(checkpoint_id, promoted.previous_id, {"promoted": promoted.changed})


def unpin(conn: psycopg.Connection, *, actor: str, reason: str | None = None) -> Transition:
    with _change(conn, "unpin", actor) as change:
        pinned_id = change.before.pinned_id
        if pinned_id is None:
            return change.unchanged(change.current_id)
        conn.execute(
            """UPDATE deploy_state
               SET pinned_id = NULL, pinned_by = NULL, pinned_at = NULL, pin_reason = NULL"""
        )
        change.record(pinned_id, reason)
        return change.changed(pinned_id, pinned_id)


# ---------------------------------------------------------------------------------------------
# Canary.


def canary(
    conn: psycopg.Connection,
    checkpoint_id: str,
    percent: float,
    *,
    actor: str,
    reason: str | None = None,
    auto: bool = False,
) -> Transition:
    """Give `percent` of NEW conversations to `checkpoint_id`; 0 aborts the canary.

    Calling it again on the running canary changes its share. One canary at a time.
    """
    if percent == 0:
        return abort_canary(conn, actor=actor, reason=reason, auto=auto)
    if not 0 < percent <= 100:
        raise InvalidTransition(f"canary percent must be in (0, 100], not {percent:g}")
    target = _fetch(conn, checkpoint_id)
    _check_canary(target)
    if target.status != "canary":
        verify_files(target.ref())
    with _change(conn, "canary", actor) as change:
        before = change.before
        _check_canary(change.fetch(checkpoint_id))
        if auto:
            _refuse_if_pinned(conn, f"automatic canary of {checkpoint_id}")
        if before.canary is not None and before.canary.id != checkpoint_id:
            raise InvalidTransition(
                f"canary {before.canary.id} is running at {before.canary_percent:g}%: promote it "
                "or abort it (`python -m deploy canary-abort`) before starting another"
            )
        previous_percent = before.canary_percent if before.canary else None
        if previous_percent == percent:
            return change.unchanged(checkpoint_id, checkpoint_id)
        _set_status(conn, checkpoint_id, "canary", reason, canary_percent=percent)
        details = {"percent": percent, "previous_percent": previous_percent, "auto": auto,
                   "serving": before.serving.id if before.serving else None}
        change.record(checkpoint_id, reason, details)
        log.info("canary: %s gets %g%% of new conversations (was %s), by %s",
                 checkpoint_id, percent, previous_percent, actor)
        return change.changed(checkpoint_id, before.canary.id if before.canary else None, details)


def _check_canary(target: Checkpoint) -> None:
    if target.status == "rejected":
        raise CheckpointRejected(target)
    if target.status == "serving":
        raise InvalidTransition(f"{target.id} is already serving every conversation")


def abort_canary(
    conn: psycopg.Connection,
    *,
    actor: str,
    reason: str | None = None,
    auto: bool = False,
    reject: bool = False,
) -> Transition:
    """End the canary: new conversations all get the serving policy again.

    The canary goes back to 'candidate' (it can be tried again), or to 'rejected' with
    reject=True (the canary decision found it worse). Ongoing canary conversations move to the
    serving policy on their next message. No canary: nothing to do.
    """
    with _change(conn, "canary_abort", actor) as change:
        running = change.before.canary
        if running is None:
            return change.unchanged(change.current_id)
        _end_canary(change, "rejected" if reject else "candidate", reason, {"auto": auto})
        return change.changed(running.id, running.id,
                              {"percent": change.before.canary_percent, "rejected": reject})


def _end_canary(change: _Change, new_status: str, reason: str | None, details: dict[str, Any]) -> None:
    before = change.before
    assert before.canary is not None
    _set_status(change.conn, before.canary.id, new_status, reason)
    change.record(before.canary.id, reason,
                  {"percent": before.canary_percent, "status": new_status, **details})
    log.info("%s: canary %s ended (%s), by %s", change.event, before.canary.id, new_status, change.actor)


def retire(conn: psycopg.Connection, checkpoint_id: str, *, actor: str, reason: str | None = None) -> Transition:
    """Take a candidate or the canary out of consideration. The serving one cannot be retired."""
    with _change(conn, "retire", actor) as change:
        target = change.fetch(checkpoint_id)
        if target.status == "serving":
            raise InvalidTransition(
                f"{checkpoint_id} is serving: promote another checkpoint or roll back "
                "(`python -m deploy rollback`); the replaced one is retired then"
            )
        if target.status in ("retired", "rejected"):
            return change.unchanged(checkpoint_id)
        _take_out(change, target, "retired", reason, {})
        return change.changed(checkpoint_id, None, {"from_status": target.status})


def reject(conn: psycopg.Connection, checkpoint_id: str, reason: str, *, actor: str,
           details: dict[str, Any] | None = None) -> Transition:
    """Mark a checkpoint as never to be served (the gate's verdict, or a person's)."""
    if not reason:
        raise InvalidTransition("a rejection needs its reason (what failed, with the numbers)")
    with _change(conn, "reject", actor) as change:
        target = change.fetch(checkpoint_id)
        if target.status == "serving":
            raise InvalidTransition(
                f"{checkpoint_id} is serving: roll back (`python -m deploy rollback`) or promote "
                "another first, then reject it"
            )
        if target.status == "rejected":
            return change.unchanged(checkpoint_id)
        _take_out(change, target, "rejected", reason, details or {})
        return change.changed(checkpoint_id, None, {"from_status": target.status})


def _take_out(change: _Change, target: Checkpoint, new_status: str, reason: str | None,
              details: dict[str, Any]) -> None:
    """`target` (not serving) -> `new_status`: the canary ends, anything else just changes."""
    if target.status == "canary":
        _end_canary(change, new_status, reason, details)
    else:
        _set_status(change.conn, target.id, new_status, reason)
        change.record(target.id, reason, {"from_status": target.status, **details})


# ---------------------------------------------------------------------------------------------
# The server's side: what each replica managed to load (shown by `status`).


async def record_load_result(
    conn: psycopg.AsyncConnection,
    checkpoint_id: str,
    *,
    replica: str,
    ok: bool,
    error: str | None = None,
    seconds: float | None = None,
) -> None:
    """Record that `replica` loaded `checkpoint_id`, or failed to (then it keeps the old one).

    An event, not a status change: one replica failing says little about the others, and
    `python -m deploy status` lists the failures for the live versions.
    """
    action = "loaded" if ok else "load_failed"
    details = {"replica": replica, "seconds": seconds, "error": error}
    async with conn.transaction():
        await conn.execute(
            """INSERT INTO checkpoint_events (checkpoint_id, action, actor, reason, details)
               VALUES (%s, %s, %s, %s, %s)""",
            (checkpoint_id, action, replica, error, Jsonb(details)),
        )
