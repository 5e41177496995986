"""Rounds are rows of retrain_runs; one at a time across processes; a crash is recorded."""

import subprocess
import sys
import textwrap

import psycopg
import pytest

from retrain.runs import RoundAlreadyRunning, recorded_run, round_lock


def _run_row(db_url, run_id):
    with psycopg.connect(db_url) as conn:
        return conn.execute(
            "SELECT status, error, finished_at, counts, timings FROM retrain_runs WHERE id = %s",
            (run_id,),
        ).fetchone()


def test_a_second_concurrent_round_is_refused_even_from_another_process(db_url):
    with round_lock(db_url):
        child = subprocess.run(
            [sys.executable, "-c", textwrap.dedent(f"""
                from retrain.runs import RoundAlreadyRunning, round_lock
                try:
                    with round_lock({db_url!r}):
                        print("entered")
                except RoundAlreadyRunning as exc:
                    print("refused:", exc)
            """)],
            capture_output=True, text=True, timeout=60,
        )
        assert child.stdout.startswith("refused: another retraining round is running"), child
        with pytest.raises(RoundAlreadyRunning):
            with recorded_run(db_url, "manual"):
                pass
    # Released: the next round may start.
    with round_lock(db_url):
        pass


def test_a_crashing_round_is_marked_failed_with_its_error(db_url):
    with pytest.raises(ZeroDivisionError):
        with recorded_run(db_url, "manual") as run:
            run.counts["pairs"] = 3
            run_id = run.id
            1 / 0
    status, error, finished_at, counts, _ = _run_row(db_url, run_id)
    assert status == "failed"
    assert "ZeroDivisionError" in error
    assert finished_at is not None
    assert counts == {"pairs": 3}


def test_a_finished_round_records_its_status_counts_and_timings(db_url):
    with recorded_run(db_url, "schedule") as run:
        run.status = "rejected"
        run.counts["prompts"] = 12
        run.timings["generation"] = 1.5
    status, error, finished_at, counts, timings = _run_row(db_url, run.id)
    assert (status, error, counts, timings) == ("rejected", None, {"prompts": 12}, {"generation": 1.5})
    assert finished_at is not None


def test_a_run_left_running_by_a_dead_process_is_closed_by_the_next_round(db_url):
    with psycopg.connect(db_url, autocommit=True) as conn:
        (dead,) = conn.execute("INSERT INTO retrain_runs (trigger) VALUES ('manual') RETURNING id").fetchone()
    with recorded_run(db_url, "manual") as run:
        run.status = "skipped"
    status, error, finished_at, _, _ = _run_row(db_url, dead)
    assert status == "failed" and error.startswith("abandoned") and finished_at is not None
    assert _run_row(db_url, run.id)[0] == "skipped"
