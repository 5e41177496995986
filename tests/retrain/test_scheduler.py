"""`python -m retrain serve`'s scheduler (retrain/scheduler.py) on real PostgreSQL: which jobs a
configuration makes, when stored feedback starts a round, and that a failing or locked-out
round never stops the scheduler."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from datetime import UTC, datetime

import psycopg
import pytest
from apscheduler.events import EVENT_JOB_EXECUTED
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger

from feedback import store
from retrain.runs import RoundAlreadyRunning, recorded_run
from retrain.scheduler import build_scheduler, enough_new_feedback, new_feedback_since


def _build(url: str, round_fn=lambda trigger: None, **overrides):
    options = dict(interval_minutes=None, cron=None, min_new_feedback=0, feedback_check_seconds=0.1)
    return build_scheduler(url, round_fn, **{**options, **overrides})


def _run_until(scheduler, done: threading.Event, timeout_s: float = 30) -> None:
    """Run the blocking scheduler here until `done` is set (or `timeout_s` passes)."""

    def stop_when_done() -> None:
        done.wait(timeout_s)
        scheduler.shutdown(wait=False)

    threading.Thread(target=stop_when_done, daemon=True).start()
    scheduler.start()


def test_nothing_to_schedule_is_refused_naming_the_settings(round_db):
    settings = "RETRAIN_INTERVAL_MINUTES, RETRAIN_CRON, RETRAIN_MIN_NEW_FEEDBACK or RETRAIN_MIN_NEW_EDITS"
    with pytest.raises(ValueError, match=settings):
        _build(round_db)


def test_each_setting_makes_its_job(round_db):
    jobs = {job.id: job for job in _build(round_db, interval_minutes=30).get_jobs()}
    assert set(jobs) == {"clock"}
    assert isinstance(jobs["clock"].trigger, IntervalTrigger)
    assert jobs["clock"].trigger.interval.total_seconds() == 30 * 60
    assert jobs["clock"].args[1] == "schedule"  # the trigger the round records

    # A crontab line wins over an interval; the feedback watcher runs beside the clock.
    jobs = {job.id: job for job in _build(round_db, interval_minutes=30, cron="15 3 * * *",
                                          min_new_feedback=5).get_jobs()}
    assert set(jobs) == {"clock", "feedback"}
    assert isinstance(jobs["clock"].trigger, CronTrigger)
    assert str(jobs["clock"].trigger.fields[CronTrigger.FIELD_NAMES.index("hour")]) == "3"
    # Neither job ever runs twice at once in this process.
    assert all(job.max_instances == 1 and job.coalesce for job in jobs.values())


def test_a_bad_crontab_line_is_refused(round_db):
    with pytest.raises(ValueError):
        _build(round_db, cron="every night")


def test_feedback_since_the_last_round_is_counted(round_db, seed_store):
    seeded = seed_store(round_db, 3, private=2)
    # Per usable conversation: the comparison and two thumbs; opted-out conversations never count.
    everything = seeded.comparisons + seeded.thumbs
    assert new_feedback_since(round_db, None).votes == everything == 9
    assert enough_new_feedback(round_db, 9) and not enough_new_feedback(round_db, 10)

    with recorded_run(round_db, "manual"):  # a round starts: what came before it is used
        pass
    assert new_feedback_since(round_db, datetime.now(UTC)).votes == 0
    assert not enough_new_feedback(round_db, 1)
    seed_store(round_db, 1, user_token="later-user")
    assert enough_new_feedback(round_db, 3) and not enough_new_feedback(round_db, 4)


async def _edit_answers(url: str, n: int) -> None:
    """`n` answers, each rewritten by its user (stored with its "edit beats original" comparison)."""
    async with await psycopg.AsyncConnection.connect(url) as conn:
        user = await store.user_for_token(conn, "editor")
        for i in range(n):
            chat = await store.create_conversation(conn, user, f"edited {i}")
            question = await store.add_message(conn, user, chat.id, None, "user", f"Name a colour ({i})")
            answer = await store.add_message(conn, user, chat.id, question.id, "assistant", "Hmm.",
                                             model_version="base-tiny")
            await store.record_demonstration(conn, user, answer.id, f"Blue ({i}).")


def test_edits_start_a_round_by_their_own_count_and_are_not_votes(round_db, seed_store):
    seed_store(round_db, 2)  # 6 votes
    asyncio.run(_edit_answers(round_db, 2))
    new = new_feedback_since(round_db, None)
    assert (new.votes, new.edits) == (6, 2)
    assert not enough_new_feedback(round_db, 7)  # the edits' comparisons are not votes too
    assert enough_new_feedback(round_db, 0, 2) and not enough_new_feedback(round_db, 0, 3)
    assert enough_new_feedback(round_db, 7, 2)  # either kind is enough

    triggers: list[str] = []
    done = threading.Event()

    def round_fn(trigger: str) -> None:
        triggers.append(trigger)
        done.set()

    # Votes never start a round here (min_new_feedback 0); two edits do.
    _run_until(_build(round_db, round_fn, min_new_edits=2), done)
    assert triggers == ["feedback"]


def test_enough_feedback_starts_a_round_at_once(round_db, seed_store):
    seed_store(round_db, 2)
    triggers: list[str] = []
    done = threading.Event()

    def round_fn(trigger: str) -> None:
        triggers.append(trigger)
        done.set()

    started = time.monotonic()
    _run_until(_build(round_db, round_fn, min_new_feedback=6, interval_minutes=60), done)
    # The watcher's first check runs when the scheduler starts, not one interval later.
    assert triggers == ["feedback"] and time.monotonic() - started < 10


def test_too_little_feedback_starts_nothing(round_db, seed_store):
    seed_store(round_db, 1)
    triggers: list[str] = []
    checks = threading.Event()
    scheduler = _build(round_db, triggers.append, min_new_feedback=100)
    scheduler.add_listener(lambda event: checks.set(), EVENT_JOB_EXECUTED)  # one check done
    _run_until(scheduler, checks)
    assert checks.is_set() and triggers == []


def test_a_failing_or_locked_out_round_does_not_stop_the_scheduler(round_db, seed_store, caplog):
    seed_store(round_db, 1)
    outcomes = iter([RoundAlreadyRunning("another process holds the round lock"), RuntimeError("PPO blew up")])
    calls: list[str] = []
    done = threading.Event()

    def round_fn(trigger: str) -> None:
        calls.append(trigger)
        failure = next(outcomes, None)
        if failure is None:
            done.set()
            return
        raise failure

    with caplog.at_level(logging.INFO, logger="retrain.scheduler"):
        _run_until(_build(round_db, round_fn, min_new_feedback=1, feedback_check_seconds=0.05), done)
    assert calls == ["feedback"] * 3  # it kept checking after both
    messages = [r.getMessage() for r in caplog.records if r.name == "retrain.scheduler"]
    assert any("round not started: another process holds the round lock" in m for m in messages)
    assert any(m == "round failed (trigger feedback)" for m in messages)
