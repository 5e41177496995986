"""A stop signal mid-round: the run is recorded 'interrupted', nothing is registered or promoted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from deploy import registry
from deploy.base_model import resolve_base_model
from retrain import runs
from retrain.__main__ import _stop_on_sigterm
from retrain.round import run_round
from retrain.runs import RoundInterrupted

REPO = Path(__file__).resolve().parents[2]


def _rows(url: str, sql: str) -> list[dict]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


def _serve_base(url: str, settings) -> str:
    with registry.connect(url) as conn:
        return registry.register_base(conn, resolve_base_model(settings.model, settings.data_dir), actor="test").id


def test_sigterm_interrupts_once_and_leaves_serving_untouched(round_db, round_settings, seed_store):
    seed_store(round_db, 8)
    base_id = _serve_base(round_db, round_settings)
    budgets = {n: getattr(round_settings, n) for n in type(round_settings).model_fields if n.startswith("retrain_")}
    env = {
        **os.environ,
        **{n.upper(): str(v) for n, v in budgets.items() if v is not None},
        # Enough PPO iterations that the round is still running when the signal comes.
        "RETRAIN_PPO_ITERATIONS": "200",
        "DATABASE_URL": round_db, "MODEL": round_settings.model, "DATA_DIR": str(round_settings.data_dir),
    }
    process = subprocess.Popen([sys.executable, "-m", "retrain", "once", "--json"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _rows(round_db, "SELECT id FROM retrain_runs WHERE status = 'running'"):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the round never started"
            time.sleep(0.1)
        time.sleep(2)  # well into the round
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    (run,) = _rows(round_db, "SELECT status, error, finished_at FROM retrain_runs")
    assert run["status"] == "interrupted" and run["error"].startswith("interrupted by SIGTERM")
    assert run["finished_at"] is not None
    assert _rows(round_db, "SELECT id, status FROM checkpoints") == [{"id": base_id, "status": "serving"}]
    assert not list(round_settings.checkpoints_dir.glob("*"))


@pytest.fixture
def sigterm_handler():
    """`retrain once`'s SIGTERM handler, installed in this process for one test."""
    before = signal.getsignal(signal.SIGTERM)
    _stop_on_sigterm(interrupted=True)
    yield
    signal.signal(signal.SIGTERM, before)
    runs.STOP_REQUESTED.clear()  # the handler also asks for a stop: no later round in this process sees it
    runs._stop_signal.clear()


def test_sigterm_interrupts_code_that_is_handling_an_exception(sigterm_handler):
    """The round's own code handles exceptions all the time (an import's fallback, a retry):
    a signal that lands there still ends the round. It used to be dropped, and the round ran on."""
    with pytest.raises(RoundInterrupted) as interrupted:
        try:
            raise ImportError("an optional dependency")
        except ImportError:
            signal.raise_signal(signal.SIGTERM)
    assert interrupted.value.code == 128 + signal.SIGTERM


def test_sigterm_still_stops_the_round_at_its_next_stage_when_its_exception_is_swallowed(sigterm_handler):
    try:
        signal.raise_signal(signal.SIGTERM)
    except BaseException:  # library code that swallows everything, the interrupt too
        pass
    with pytest.raises(RoundInterrupted) as interrupted:
        runs.stop_if_asked("gate")
    assert interrupted.value.where == "before gate" and interrupted.value.code == 128 + signal.SIGTERM


def test_sigterm_lets_the_round_finish_writing_its_outcome(sigterm_handler):
    with runs.recording_outcome():
        signal.raise_signal(signal.SIGTERM)  # ignored: the row is being written
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # a second one ends the process


def test_a_stop_request_interrupts_a_round_at_its_next_stage(round_db, round_settings, seed_store):
    """How `retrain serve` stops: its rounds run in a worker thread, so SIGTERM asks for a stop
    that the round honours as its next stage begins."""
    seed_store(round_db, 8)
    base_id = _serve_base(round_db, round_settings)
    runs.request_stop(signal.SIGTERM)
    try:
        with pytest.raises(RoundInterrupted):
            run_round(round_settings, "schedule")
    finally:
        runs.STOP_REQUESTED.clear()
        runs._stop_signal.clear()
    (run,) = _rows(round_db, "SELECT status, error FROM retrain_runs")
    assert run == {"status": "interrupted", "error": "interrupted by SIGTERM before read_data"}
    assert _rows(round_db, "SELECT id, status FROM checkpoints") == [{"id": base_id, "status": "serving"}]


def test_sigterm_stops_serve_mid_round_and_it_exits_0(round_db, round_settings, seed_store):
    seed_store(round_db, 8)
    base_id = _serve_base(round_db, round_settings)
    budgets = {n: getattr(round_settings, n) for n in type(round_settings).model_fields if n.startswith("retrain_")}
    env = {
        **os.environ,
        **{n.upper(): str(v) for n, v in budgets.items() if v is not None},
        # A round as soon as the scheduler counts the seeded feedback.
        "RETRAIN_MIN_NEW_FEEDBACK": "1", "RETRAIN_FEEDBACK_CHECK_SECONDS": "0.5",
        "DATABASE_URL": round_db, "MODEL": round_settings.model, "DATA_DIR": str(round_settings.data_dir),
    }
    process = subprocess.Popen([sys.executable, "-m", "retrain", "serve"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120
        while not _rows(round_db, "SELECT id FROM retrain_runs WHERE status = 'running'"):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no round started"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, output[-3000:]
    assert "scheduler stopped" in output and "Traceback" not in output, output[-3000:]
    (run,) = _rows(round_db, "SELECT status, error FROM retrain_runs")
    assert run["status"] == "interrupted" and run["error"].startswith("interrupted by SIGTERM before")
    assert _rows(round_db, "SELECT id, status FROM checkpoints") == [{"id": base_id, "status": "serving"}]
