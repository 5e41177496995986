"""`python -m retrain serve`: rounds on an interval or cron, and when enough feedback arrived.

apscheduler 3.x runs two jobs in one process: the clock (an interval or a crontab line) and a
feedback watcher that starts a round early once `min_new_feedback` votes (thumbs and
comparisons) or `min_new_edits` edited answers have arrived since the last round began. Both
call the same round function; the round's advisory lock (retrain/runs.py) keeps it to one at a
time across every process sharing the database, and each job has max_instances=1 so this
process never queues rounds behind itself.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from apscheduler.schedulers.blocking import BlockingScheduler
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from .runs import RoundAlreadyRunning, RoundInterrupted, last_run

if TYPE_CHECKING:
    from feedback.training_data import NewFeedback

log = logging.getLogger(__name__)


class _RoundStillRunning(logging.Filter):
    """apscheduler warns at every feedback check that finds the previous check's round still
    running (max_instances=1 doing its job): expected, and one line every few seconds for the
    whole round would bury the round's own log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "maximum number of running instances reached" not in record.getMessage()


logging.getLogger("apscheduler.scheduler").addFilter(_RoundStillRunning())


def new_feedback_since(url: str, since: datetime | None) -> NewFeedback:
    """Votes and edits stored (or changed) after `since` (all of them when None)."""
    import psycopg

    from feedback.training_data import feedback_count_since

    with psycopg.connect(url) as conn:
        return feedback_count_since(conn, since or datetime.fromtimestamp(0, timezone.utc))


def _guarded(round_fn: Callable[[str], object], trigger: str) -> None:
    try:
        round_fn(trigger)
    except RoundAlreadyRunning as exc:
        log.info("round not started: %s", exc)
    except RoundInterrupted:  # `serve` got SIGTERM; the run is recorded 'interrupted'
        log.info("round interrupted (trigger %s)", trigger)
    except Exception:  # the failure is recorded in retrain_runs; the scheduler keeps going
        log.exception("round failed (trigger %s)", trigger)


def enough_new_feedback(url: str, min_votes: int, min_edits: int = 0) -> bool:
    """Whether votes or edits since the last round began reach their minimum (0: that kind
    never starts a round by itself)."""
    previous = last_run(url)
    new = new_feedback_since(url, previous["started_at"] if previous else None)
    log.debug("%d new votes (need %d) and %d new edits (need %d) since the last round",
              new.votes, min_votes, new.edits, min_edits)
    return (min_votes > 0 and new.votes >= min_votes) or (min_edits > 0 and new.edits >= min_edits)


def build_scheduler(
    url: str,
    round_fn: Callable[[str], object],
    *,
    interval_minutes: float | None,
    cron: str | None,
    min_new_feedback: int,
    feedback_check_seconds: float,
    min_new_edits: int = 0,
) -> BlockingScheduler:
    scheduler = BlockingScheduler(timezone=timezone.utc)
    if cron:
        clock = CronTrigger.from_crontab(cron, timezone=timezone.utc)
    elif interval_minutes:
        clock = IntervalTrigger(minutes=interval_minutes)
    else:
        clock = None
    if clock is not None:
        scheduler.add_job(
            _guarded, clock, args=(round_fn, "schedule"), id="clock",
            max_instances=1, coalesce=True, misfire_grace_time=None,
        )
    if min_new_feedback > 0 or min_new_edits > 0:
        def watch() -> None:
            if enough_new_feedback(url, min_new_feedback, min_new_edits):
                _guarded(round_fn, "feedback")

        scheduler.add_job(
            watch, IntervalTrigger(seconds=feedback_check_seconds), id="feedback",
            max_instances=1, coalesce=True, next_run_time=datetime.now(timezone.utc),
        )
    if not scheduler.get_jobs():
        raise ValueError(
            "nothing to schedule: set RETRAIN_INTERVAL_MINUTES, RETRAIN_CRON, "
            "RETRAIN_MIN_NEW_FEEDBACK or RETRAIN_MIN_NEW_EDITS (> 0)"
        )
    return scheduler
