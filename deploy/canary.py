"""Canary: which version a new conversation gets, and whether the canary is winning.

A conversation's version is chosen once, when it starts: its id is hashed (salted with the
canary's id) to a point in [0, 100), and the canary gets the conversations whose point is
under its percent. The same id always lands on the same point, so the choice is the same on
every replica and raising the percent only adds conversations to the canary, never moves one
out. The server stores the choice in `conversations.model_version` (`sticky_version`), so a
conversation keeps its version while the canary runs even if the percent is lowered.

The report compares live thumbs-up rates (ratings on assistant messages, by the message's
model_version) with Wilson score intervals; the decision is "promote" or "abort" only when the
two intervals do not overlap and both versions have enough ratings.
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import asdict, dataclass
from datetime import datetime
from statistics import NormalDist
from typing import Any
from uuid import UUID

import psycopg
from psycopg.rows import tuple_row

from . import registry
from .errors import NoServingPolicy, Refused
from .state import ServingState

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Choosing a version.


def bucket(conversation_id: UUID | str, salt: str = "") -> float:
    """The conversation's point in [0, 100): uniform, and stable across processes and restarts."""
    digest = hashlib.sha256(f"{salt}:{str(conversation_id).lower()}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 * 100


def choose_version(
    conversation_id: UUID | str, state: ServingState, assigned: str | None = None
) -> str:
    """The checkpoint id (model_version) that should answer in this conversation.

    `assigned` is the version the conversation was given before, if any: it is kept while it is
    still live (serving or in canary); otherwise (retired, aborted) the choice is made afresh.
    """
    if state.serving is None:
        raise NoServingPolicy()
    if assigned is not None and assigned in state.live_versions:
        return assigned
    if state.canary is not None and state.canary_percent is not None:
        if bucket(conversation_id, salt=state.canary.id) < state.canary_percent:
            return state.canary.id
    return state.serving.id


async def sticky_version(
    conn: psycopg.AsyncConnection, conversation_id: UUID | str, state: ServingState
) -> str:
    """Choose the conversation's version and remember it in conversations.model_version.

    Call it when a conversation gets a new assistant answer; an unknown conversation id gets
    the hash choice without being stored.
    """
    async with conn.transaction():
        cur = conn.cursor(row_factory=tuple_row)
        await cur.execute(
            "SELECT model_version FROM conversations WHERE id = %s FOR UPDATE", (conversation_id,)
        )
        row = await cur.fetchone()
        assigned = row[0] if row else None
        version = choose_version(conversation_id, state, assigned)
        if row is not None and version != assigned:
            await conn.execute(
                "UPDATE conversations SET model_version = %s WHERE id = %s",
                (version, conversation_id),
            )
    return version


# ---------------------------------------------------------------------------------------------
# Thumbs-up rates.


def z_for(confidence: float) -> float:
    """Two-sided normal quantile: 0.95 -> 1.959964."""
    return NormalDist().inv_cdf(1 - (1 - confidence) / 2)


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion; (0, 1) when there is no data.

    Better than the normal approximation at small counts and near 0 or 1, which is where a
    young canary lives.
    """
    if total <= 0:
        return (0.0, 1.0)
    if not 0 <= successes <= total:
        raise ValueError(f"successes must be within 0..total, got {successes}/{total}")
    z = z_for(confidence)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denominator
    return (max(0.0, centre - half), min(1.0, centre + half))


@dataclass
class VersionStats:
    version: str
    role: str  # 'serving' | 'canary'
    up: int  # thumbs up
    down: int  # thumbs down
    low: float  # Wilson interval on the thumbs-up rate
    high: float

    @property
    def ratings(self) -> int:
        return self.up + self.down

    @property
    def rate(self) -> float | None:
        return self.up / self.ratings if self.ratings else None

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "ratings": self.ratings, "rate": self.rate}


@dataclass
class CanaryReport:
    canary_id: str | None
    serving_id: str | None
    percent: float | None
    since: datetime | None  # ratings on messages written since the canary started
    confidence: float
    min_ratings: int
    versions: list[VersionStats]
    decision: str  # 'promote' | 'abort' | 'continue' | 'no_canary'
    explanation: str
    action_taken: str | None = None  # what canary_decide did about it, if anything

    def to_json(self) -> dict[str, Any]:
        return {
            "canary_id": self.canary_id,
            "serving_id": self.serving_id,
            "percent": self.percent,
            "since": self.since.isoformat() if self.since else None,
            "confidence": self.confidence,
            "min_ratings": self.min_ratings,
            "versions": [v.to_json() for v in self.versions],
            "decision": self.decision,
            "explanation": self.explanation,
            "action_taken": self.action_taken,
        }


def _canary_started(conn: psycopg.Connection, canary_id: str) -> datetime | None:
    """When the running canary began: its latest 'canary' event that was not a percent change."""
    row = conn.cursor(row_factory=tuple_row).execute(
        """SELECT created_at FROM checkpoint_events
           WHERE checkpoint_id = %s AND action = 'canary'
             AND details->>'previous_percent' IS NULL
           ORDER BY id DESC LIMIT 1""",
        (canary_id,),
    ).fetchone()
    return row[0] if row else None


def thumbs_by_version(
    conn: psycopg.Connection, versions: list[str], since: datetime | None
) -> dict[str, tuple[int, int]]:
    """(thumbs up, thumbs down) per model_version, on assistant messages written since `since`."""
    rows = conn.cursor(row_factory=tuple_row).execute(
        """SELECT m.model_version,
                  count(*) FILTER (WHERE r.rating = 1),
                  count(*) FILTER (WHERE r.rating = -1)
           FROM ratings r JOIN messages m ON m.id = r.message_id
           WHERE m.role = 'assistant' AND m.model_version = ANY(%s)
             AND (%s::timestamptz IS NULL OR m.created_at >= %s)
           GROUP BY m.model_version""",
        (versions, since, since),
    ).fetchall()
    counts = {v: (0, 0) for v in versions}
    counts.update({version: (up, down) for version, up, down in rows})
    return counts


def canary_report(
    conn: psycopg.Connection, *, confidence: float = 0.95, min_ratings: int = 30
) -> CanaryReport:
    """Live thumbs-up rate of the canary against the serving policy over the same period."""
    state = registry.read_state(conn)
    if state.canary is None or state.serving is None:
        return CanaryReport(
            None, state.serving.id if state.serving else None, None, None, confidence,
            min_ratings, [], "no_canary",
            "no canary is running: start one with `python -m deploy canary ID PERCENT`",
        )
    # The same window for both: the serving policy's older ratings would compare times, not versions.
    since = _canary_started(conn, state.canary.id)
    counts = thumbs_by_version(conn, [state.serving.id, state.canary.id], since)
    stats = []
    for role, version in (("serving", state.serving.id), ("canary", state.canary.id)):
        up, down = counts[version]
        low, high = wilson_interval(up, up + down, confidence)
        stats.append(VersionStats(version, role, up, down, low, high))
    decision, explanation = decide(stats[0], stats[1], min_ratings, confidence)
    return CanaryReport(
        state.canary.id, state.serving.id, state.canary_percent, since, confidence, min_ratings,
        stats, decision, explanation,
    )


def decide(
    serving: VersionStats, canary: VersionStats, min_ratings: int, confidence: float
) -> tuple[str, str]:
    """'promote' / 'abort' when the intervals separate with enough ratings, else 'continue'."""
    short = [v for v in (serving, canary) if v.ratings < min_ratings]
    if short:
        needs = ", ".join(f"{v.version} has {v.ratings}" for v in short)
        return "continue", f"not enough thumbs yet ({needs}; {min_ratings} each needed)"
    level = f"{confidence:.0%}"
    if canary.low > serving.high:
        return "promote", (
            f"canary {canary.version} is better: thumbs-up {canary.rate:.1%} "
            f"[{canary.low:.1%}, {canary.high:.1%}] vs {serving.rate:.1%} "
            f"[{serving.low:.1%}, {serving.high:.1%}] ({level} intervals do not overlap)"
        )
    if canary.high < serving.low:
        return "abort", (
            f"canary {canary.version} is worse: thumbs-up {canary.rate:.1%} "
            f"[{canary.low:.1%}, {canary.high:.1%}] vs {serving.rate:.1%} "
            f"[{serving.low:.1%}, {serving.high:.1%}] ({level} intervals do not overlap)"
        )
    return "continue", (
        f"no decision yet: the {level} intervals overlap "
        f"({canary.version} [{canary.low:.1%}, {canary.high:.1%}], "
        f"{serving.version} [{serving.low:.1%}, {serving.high:.1%}]); keep collecting thumbs"
    )


def canary_decide(
    conn: psycopg.Connection,
    *,
    actor: str,
    confidence: float = 0.95,
    min_ratings: int = 30,
    apply: bool = True,
) -> CanaryReport:
    """The report, and with apply=True its decision carried out as an automatic change.

    A decisive win promotes the canary (refused while pinned: the report says so); a decisive
    loss aborts it and rejects the candidate (an abort is allowed while pinned: it only
    returns conversations to the pinned policy).
    """
    report = canary_report(conn, confidence=confidence, min_ratings=min_ratings)
    if not apply or report.decision not in ("promote", "abort"):
        return report
    assert report.canary_id is not None
    try:
        if report.decision == "promote":
            registry.promote(conn, report.canary_id, actor=actor, reason=report.explanation, auto=True)
            report.action_taken = f"promoted {report.canary_id}"
        else:
            registry.abort_canary(conn, actor=actor, reason=report.explanation, auto=True, reject=True)
            report.action_taken = f"aborted the canary and rejected {report.canary_id}"
    except Refused as exc:
        report.action_taken = f"not applied: {exc.message}"
    log.info("canary decision: %s (%s)", report.action_taken, report.explanation)
    return report
