"""A round as a launch of several processes, started and waited for by one that stays out of it.

`accelerate launch --num_processes N -m retrain once` runs a round on N processes by itself
(retrain/ranks.py says who does what). With RETRAIN_LAUNCHER set, `python -m retrain once` and
every round of `python -m retrain serve` start that launch as a child and wait for it, which
adds what a launcher cannot do:

- exit codes: a launcher reports any process's non-zero exit as its own failure (exit 1), so
  the processes of a launch exit 0 unless the round failed; the main process writes its result
  to a file (`once --result-file`), from which this process returns 0 / 3 / 4 / 5 as a round in
  one process does;
- the scheduler: `serve` runs rounds in its own process, one at a time; a launch per round
  keeps it that way (running `serve` itself under a launcher would start N schedulers);
- clean-up after a launch that died: with no result back (a process killed, the launcher
  stopping the rest), the round lock is free again, so a 'running' row is the dead round's:
  it is marked failed with the launcher's exit code and its reward model removed. A round
  records its own failure when it can; this covers a main process that could not.

The launch gets DATABASE_URL (so it uses the same database, embedded or not) and the rest of
this process's environment, less RETRAIN_LAUNCHER.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import subprocess
import tempfile
from dataclasses import fields
from pathlib import Path

from .round import RoundResult, forget_reward_models
from .runs import RoundAlreadyRunning, close_abandoned_runs, round_lock
from .settings import RetrainSettings

log = logging.getLogger(__name__)


class LaunchFailed(RuntimeError):
    """The launched round failed, or ended without saying how (its run, if any, is closed)."""

    def __init__(self, message: str, run_id: int | None = None):
        super().__init__(message)
        self.run_id = run_id


def inside_launch() -> bool:
    """True in a process that a launcher started (torchrun and accelerate launch set these)."""
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def launcher_for(settings: RetrainSettings) -> str | None:
    """The launcher to start a round with, or None: this process runs the round itself (no
    RETRAIN_LAUNCHER, or this process is already one of a launch and must not launch again)."""
    if not settings.retrain_launcher:
        return None
    if inside_launch():
        log.warning("RETRAIN_LAUNCHER is set but this process is already one of a launch: not launching again")
        return None
    return settings.retrain_launcher


def launch_command(launcher: str, trigger: str, result_file: Path) -> list[str]:
    return [*shlex.split(launcher), "-m", "retrain", "once", "--trigger", trigger, "--result-file", str(result_file)]


def launch_round(settings: RetrainSettings, trigger: str, *, url: str, launcher: str) -> RoundResult:
    """Run one round as a launch of `launcher` and return its result (as `run_round` does).
    Raises RoundAlreadyRunning when the launched round found the lock held, LaunchFailed when it
    failed or died."""
    env = {**os.environ, "DATABASE_URL": url}
    env.pop("RETRAIN_LAUNCHER", None)
    with tempfile.TemporaryDirectory(prefix="retrain-launch-") as scratch:
        result_file = Path(scratch) / "result.json"
        command = launch_command(launcher, trigger, result_file)
        log.info("launching the round: %s", shlex.join(command))
        try:
            # The launch's logs and progress go where ours do; its stdout too, so that ours stays
            # the one JSON document `once --json` promises.
            returncode = subprocess.run(command, env=env, stdout=2, check=False).returncode
        except OSError as exc:
            raise LaunchFailed(f"RETRAIN_LAUNCHER={launcher!r} could not be started: {exc}") from exc
        document = json.loads(result_file.read_text()) if result_file.is_file() else None

    if document is None:
        error = (f"the launched round ended without a result: `{shlex.join(command)}` exited {returncode} "
                 "(a process was killed or failed before the main process could record it)")
        closed = close_dead_round(url, settings, error)
        raise LaunchFailed(error, run_id=closed[-1] if closed else None)
    if returncode:
        log.warning("the launch exited %d after its main process recorded the round's result", returncode)
    if document.get("error") == "busy":
        raise RoundAlreadyRunning(document["message"])
    if document.get("error"):
        raise LaunchFailed(document["message"], run_id=document.get("run_id"))
    return RoundResult(**{f.name: document[f.name] for f in fields(RoundResult)})


def close_dead_round(url: str, settings: RetrainSettings, error: str) -> list[int]:
    """After a launch died: mark the run it left 'running' failed with `error` and remove its
    reward model. Returns the closed run ids (none when another round holds the lock: that one
    closed ours when it started)."""
    try:
        with round_lock(url) as conn:
            closed = close_abandoned_runs(conn, error)
    except RoundAlreadyRunning:
        return []
    forget_reward_models(settings.reward_dir, closed)
    return closed
