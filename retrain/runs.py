"""Retraining rounds as rows of `retrain_runs`, one at a time across all processes.

A round holds a session-level PostgreSQL advisory lock on a connection of its own for its whole
length: a second round (another process, another machine sharing the database) is refused at
once instead of queueing, and a crashed process releases the lock with its connection.
"""

from __future__ import annotations

import json
import logging
import math
import signal
import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import psycopg
from psycopg.rows import dict_row

log = logging.getLogger(__name__)

# Fixed key: every retraining process contends on the same lock. Distinct from the migration
# lock (...01) and the registry's (...02): a round holds this one while it registers its
# candidate, and the registry's transaction lock must not wait on the round itself.
ROUND_LOCK_KEY = 0x466C7977_00000003


class RoundAlreadyRunning(RuntimeError):
    """Another retraining round holds the lock; this one was not started."""


class RoundInterrupted(SystemExit):
    """A stop signal ended the round: its row says 'interrupted' (not 'failed'), nothing it
    made is registered or promoted, and the process exits 128 + the signal's number. A
    SystemExit, so it passes through the round's failure handling as an interrupt does."""

    def __init__(self, signum: int, where: str = "") -> None:
        super().__init__(128 + signum)
        self.signal_name = signal.Signals(signum).name
        self.where = where


# Set by a stop signal that cannot interrupt the round where it runs (`retrain serve` runs
# rounds in a worker thread): the round stops at its next stage (`stop_if_asked`).
STOP_REQUESTED = threading.Event()
_stop_signal: list[int] = []


# Set while a round writes its outcome (its row, the removal of its files): a stop signal there
# must not raise on top of that work and leave it half done. The process ends right after anyway.
RECORDING_OUTCOME = threading.Event()


@contextmanager
def recording_outcome() -> Iterator[None]:
    RECORDING_OUTCOME.set()
    try:
        yield
    finally:
        RECORDING_OUTCOME.clear()


def request_stop(signum: int) -> None:
    _stop_signal.append(signum)
    STOP_REQUESTED.set()


def stop_if_asked(stage: str) -> None:
    """Raise RoundInterrupted if a stop was requested (called as each stage begins)."""
    if STOP_REQUESTED.is_set():
        raise RoundInterrupted(_stop_signal[0] if _stop_signal else signal.SIGTERM, f"before {stage}")


@dataclass
class Run:
    """A round in progress: what it counted, measured and how long each stage took."""

    id: int
    trigger: str
    status: str = "succeeded"  # or "rejected" (the gate said no) / "skipped" (too little data)
    candidate_id: str | None = None
    counts: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    timings: dict = field(default_factory=dict)  # stage -> seconds
    abandoned: list[int] = field(default_factory=list)  # runs found dead and closed when this one started


@contextmanager
def round_lock(url: str) -> Iterator[psycopg.Connection]:
    """Hold the cross-process round lock, or raise RoundAlreadyRunning at once."""
    conn = psycopg.connect(url, autocommit=True)
    try:
        got = conn.execute("SELECT pg_try_advisory_lock(%s)", (ROUND_LOCK_KEY,)).fetchone()[0]
        if not got:
            raise RoundAlreadyRunning(
                "another retraining round is running (advisory lock held); "
                "wait for it to finish or see `retrain_runs` for its progress"
            )
        try:
            yield conn
        finally:
            conn.execute("SELECT pg_advisory_unlock(%s)", (ROUND_LOCK_KEY,))
    finally:
        conn.close()


ABANDONED = ("abandoned: the process running this round died before finishing "
             "(killed or out of memory?); found when the next round started")


def close_abandoned_runs(conn: psycopg.Connection, error: str = ABANDONED) -> list[int]:
    """Mark every 'running' row failed with `error`; call only while holding the round lock.
    Holding it, no round can be running: such a row is one whose process died without a word
    (killed, out of memory, power cut, a launched rank that took the others down). Returns
    their ids, so the caller can remove what those rounds left on disk."""
    abandoned = conn.execute(
        """UPDATE retrain_runs SET status = 'failed', finished_at = now(), error = %s
           WHERE status = 'running' RETURNING id""",
        (error,),
    ).fetchall()
    for (run_id,) in abandoned:
        log.warning("retrain run %d was left 'running' by a process that died: marked failed", run_id)
    return [run_id for (run_id,) in abandoned]


def start_run(conn: psycopg.Connection, trigger: str) -> Run:
    abandoned = close_abandoned_runs(conn)  # so the history is true before this round begins
    row = conn.execute(
        "INSERT INTO retrain_runs (trigger) VALUES (%s) RETURNING id", (trigger,)
    ).fetchone()
    return Run(id=row[0], trigger=trigger, abandoned=abandoned)


def _json(value) -> str:
    """JSON that PostgreSQL's jsonb accepts: a diverged metric (NaN, inf) becomes null rather
    than making the run's final update fail and leaving it 'running' forever."""

    def clean(v):
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {str(k): clean(x) for k, x in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(x) for x in v]
        return v

    return json.dumps(clean(value), default=str)


def finish_run(
    conn: psycopg.Connection, run: Run, status: str, candidate_id: str | None = None,
    error: str | None = None,
) -> None:
    conn.execute(
        """UPDATE retrain_runs SET status = %s, finished_at = now(), counts = %s, metrics = %s,
               timings = %s, candidate_id = %s, error = %s
           WHERE id = %s""",
        (
            status, _json(run.counts), _json(run.metrics), _json(run.timings),
            candidate_id, error, run.id,
        ),
    )


@contextmanager
def recorded_run(url: str, trigger: str) -> Iterator[Run]:
    """Lock, open a `retrain_runs` row, and close it: failed with the traceback if the body
    raises, interrupted if a stop signal ended it (the exception propagates; serving is never
    touched by a failed or interrupted round)."""
    with round_lock(url) as conn:
        run = start_run(conn, trigger)
        log.info("retrain run %d started (%s)", run.id, trigger)
        try:
            yield run
        except (RoundInterrupted, KeyboardInterrupt) as exc:
            with recording_outcome():
                name = getattr(exc, "signal_name", "SIGINT")
                where = getattr(exc, "where", "")
                finish_run(conn, run, "interrupted", error=f"interrupted by {name} {where}".strip())
                log.warning("retrain run %d interrupted by %s %s", run.id, name, where)
            raise
        except BaseException as exc:
            with recording_outcome():
                finish_run(conn, run, "failed", error="".join(traceback.format_exception(exc))[-8000:])
                log.error("retrain run %d failed: %s", run.id, exc)
            raise
        with recording_outcome():
            finish_run(conn, run, run.status, candidate_id=run.candidate_id)
            log.info("retrain run %d %s", run.id, run.status)


def last_run(url: str) -> dict | None:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(
            "SELECT * FROM retrain_runs ORDER BY started_at DESC, id DESC LIMIT 1"
        ).fetchone()
