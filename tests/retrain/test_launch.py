"""A round as two real processes (`accelerate launch` on CPU, gloo), started by `python -m retrain
once` through RETRAIN_LAUNCHER: one run row, one checkpoint, the exit codes of a round in one
process; and a process that crashes leaves nothing behind."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
from psycopg.rows import dict_row

from deploy import checkpoint
from retrain.launch import LaunchFailed, launch_round
from retrain.runs import round_lock, start_run

REPO = Path(__file__).resolve().parents[2]
LENIENT_GATE = {"min_win_rate": -1.0, "min_reward_gain": -1e9, "max_kl": 1e9, "max_empty_rate": 1.0,
                "max_truncated_rate_increase": 1.0, "max_repetitive_rate": 1.0,
                "min_reward_accuracy": 0.0, "reward_accuracy_confidence": 0.5, "min_reward_pairs": 0}

# Test-only: started in every process of the launch (Python imports `sitecustomize` from the
# path at start-up); the process whose LOCAL_RANK is CRASH_PPO_ON_RANK fails at PPO.
CRASH_HOOK = '''
import os
if os.environ.get("LOCAL_RANK") is not None and os.environ.get("LOCAL_RANK") == os.environ.get("CRASH_PPO_ON_RANK"):
    import retrain.round

    def crash(*args, **kwargs):
        raise RuntimeError("PPO blew up on process " + os.environ["LOCAL_RANK"])

    retrain.round.train_ppo = crash
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_once(settings, tmp_path: Path, processes: int, **extra_env) -> subprocess.CompletedProcess:
    """`python -m retrain once --json` with RETRAIN_LAUNCHER = accelerate launch of `processes`
    CPU processes, and the tiny budgets of `round_settings`."""
    config_file = tmp_path / "retrain.json"
    config_file.write_text(json.dumps({"gate": LENIENT_GATE}))
    launcher = (f"{sys.executable} -m accelerate.commands.launch --multi_gpu --num_processes {processes} "
                f"--num_machines 1 --mixed_precision no --dynamo_backend no --main_process_port {_free_port()}")
    budgets = {name: getattr(settings, name) for name in type(settings).model_fields if name.startswith("retrain_")}
    env = {
        **os.environ,
        **{name.upper(): str(value) for name, value in budgets.items() if value is not None},
        "DATABASE_URL": settings.database_url, "MODEL": settings.model, "DATA_DIR": str(settings.data_dir),
        "RETRAIN_CONFIG_FILE": str(config_file),
        "RETRAIN_LAUNCHER": launcher,
        "ACCELERATE_USE_CPU": "1",  # accelerate's multi-CPU (gloo) data parallelism
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": os.pathsep.join([str(tmp_path / "hooks"), str(REPO)]),
        **extra_env,
    }
    return subprocess.run([sys.executable, "-m", "retrain", "once", "--json"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _rows(url: str, sql: str) -> list[dict]:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute(sql).fetchall()


def test_a_round_on_two_processes_records_one_run_and_registers_one_checkpoint(
    round_db, round_settings, seed_store, tmp_path
):
    seed_store(round_db, 10)

    done = _launch_once(round_settings, tmp_path, processes=2)

    assert done.returncode == 0, done.stderr[-4000:]
    result = json.loads(done.stdout)
    assert (result["status"], result["exit_code"], result["promoted"]) == ("succeeded", 0, True)
    runs = _rows(round_db, "SELECT * FROM retrain_runs")
    assert [(r["id"], r["status"]) for r in runs] == [(result["run_id"], "succeeded")]
    assert runs[0]["metrics"]["processes"] == 2
    # Both processes answered their half of the gate's prompts; the main process judged them all.
    assert runs[0]["metrics"]["gate"]["prompts"] == runs[0]["counts"]["gate_prompts_used"] >= 2
    candidates = _rows(round_db, "SELECT id, status, path FROM checkpoints WHERE kind = 'lora'")
    assert [(c["id"], c["status"]) for c in candidates] == [(result["candidate_id"], "serving")]
    manifest = checkpoint.verify(Path(candidates[0]["path"]))
    assert manifest.config["round"]["processes"] == 2
    assert manifest.config["round"]["run_id"] == result["run_id"]
    assert [p.name for p in round_settings.reward_dir.iterdir()] == [f"run-{result['run_id']:06d}"]
    assert [p.name for p in round_settings.checkpoints_dir.iterdir()] == [result["candidate_id"]]


def test_a_process_that_crashes_fails_the_round_and_leaves_nothing_behind(
    round_db, round_settings, seed_store, tmp_path
):
    seed_store(round_db, 8)
    (tmp_path / "hooks").mkdir()
    (tmp_path / "hooks" / "sitecustomize.py").write_text(CRASH_HOOK)

    done = _launch_once(round_settings, tmp_path, processes=2, CRASH_PPO_ON_RANK="1")

    assert done.returncode == 1, done.stderr[-4000:]
    assert json.loads(done.stdout)["error"] == "failed"
    runs = _rows(round_db, "SELECT status, error, finished_at FROM retrain_runs")
    assert len(runs) == 1 and runs[0]["status"] == "failed" and runs[0]["finished_at"] is not None
    assert "remote worker crashing" in runs[0]["error"]  # the main process saw its peer go
    checkpoints = _rows(round_db, "SELECT kind, status FROM checkpoints")
    assert checkpoints == [{"kind": "full", "status": "serving"}]  # the base model, still serving
    assert not list(round_settings.reward_dir.glob("run-*"))  # no warm start from a failed round
    assert not list(round_settings.checkpoints_dir.glob("*"))


def test_a_launch_that_dies_without_a_result_has_its_run_closed_and_its_reward_model_removed(
    round_db, round_settings
):
    # What a launch whose main process was killed leaves: a 'running' row (the lock went with
    # its connection) and the reward model it had written.
    with round_lock(round_db) as conn:
        dead = start_run(conn, "schedule")
    leftover = round_settings.reward_dir / f"run-{dead.id:06d}"
    leftover.mkdir(parents=True)

    with pytest.raises(LaunchFailed, match="ended without a result: `false .*` exited 1") as failure:
        launch_round(round_settings, "manual", url=round_db, launcher="false")  # exits 1, says nothing

    assert failure.value.run_id == dead.id
    (run,) = _rows(round_db, "SELECT status, error FROM retrain_runs")
    assert run["status"] == "failed" and "ended without a result" in run["error"]
    assert not leftover.exists()
    with pytest.raises(LaunchFailed, match="could not be started"):
        launch_round(round_settings, "manual", url=round_db, launcher="/nonexistent/launcher")
