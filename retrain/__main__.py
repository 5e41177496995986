"""`python -m retrain once | serve | config`: retraining's command line.

  once    run one round now; print where the time went and what the gate decided
  serve   run rounds on a schedule (RETRAIN_INTERVAL_MINUTES / RETRAIN_CRON) and when enough
          new votes or edits arrived (RETRAIN_MIN_NEW_FEEDBACK, RETRAIN_MIN_NEW_EDITS)
  config  the full config a round would use, every field with its help

Exit codes of `once`: 0 a candidate passed the gate (and was registered), 1 the round failed
(its retrain_runs row has the traceback), 2 usage, 3 the gate rejected the candidate (or PPO kept
no update, so there was none), 4 skipped
(too little data), 5 another round is running, 143 stopped by SIGTERM (its row says
'interrupted'; nothing registered or promoted). `serve` on SIGTERM starts no new round, lets
the running one stop at its next stage (recorded 'interrupted') and exits 0. `--json` prints one JSON document on stdout;
logs and progress bars go to stderr.

Several processes: `accelerate launch --num_processes N -m retrain once` runs the round as N
processes (retrain/ranks.py). A launcher turns any non-zero exit into its own failure, so the
processes of a launch exit 0 unless the round failed (1); the main process prints the outcome.
With RETRAIN_LAUNCHER set, `once` starts that launch itself and returns the codes above
(retrain/launch.py), and so does every round of `serve`.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from feedback.logs import configure_logging

log = logging.getLogger("retrain")

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_REJECTED, EXIT_SKIPPED, EXIT_BUSY = 0, 1, 2, 3, 4, 5
EXIT_BY_STATUS = {"succeeded": EXIT_OK, "rejected": EXIT_REJECTED, "skipped": EXIT_SKIPPED}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m retrain",
        description="Flywheel's retraining: reward model refresh, PPO, gate, registration.",
        epilog="Exit codes (once): 0 passed, 1 failed, 2 usage, 3 rejected by the gate "
        "(or no candidate: PPO kept no update), 4 skipped (too little data), 5 another round is running.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    once = commands.add_parser("once", help="run one round now and print its time breakdown")
    once.add_argument("--json", action="store_true", help="machine-readable result on stdout")
    once.add_argument("--trigger", default="manual", help="recorded as the run's trigger (default: manual)")
    once.add_argument("--result-file", type=Path, metavar="PATH",
                      help="write the result's JSON document to PATH instead of stdout (how a launched "
                      "round reports back to RETRAIN_LAUNCHER's caller)")
    commands.add_parser("serve", help="run rounds on the schedule and on new feedback")
    config = commands.add_parser("config", help="print the full round config with help text")
    config.add_argument("--json", action="store_true", help="the config as JSON")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging()
    # Imported after parsing: `--help` should not wait for torch.
    from .settings import RetrainSettings

    settings = RetrainSettings()
    if settings.retrain_threads and args.command in ("once", "serve"):
        import torch

        torch.set_num_threads(settings.retrain_threads)  # this process is the round's own
    return {"once": cmd_once, "serve": cmd_serve, "config": cmd_config}[args.command](args, settings)


def _database(settings) -> str:
    from feedback.db import database_url
    from feedback.migrate import migrate

    url = database_url(settings)
    migrate(url)  # idempotent: a fresh DATA_DIR works with this command alone
    return url


def cmd_once(args, settings) -> int:
    from .launch import LaunchFailed, launch_round, launcher_for
    from .ranks import this_process
    from .round import RoundFailed, run_round
    from .runs import RoundAlreadyRunning

    launcher = launcher_for(settings)
    ranks = None if launcher else this_process()  # None: this process only starts the launch and waits
    # A launcher turns any non-zero exit into its own failure: a launch's processes exit 0
    # unless the round failed, and the main process says how it ended.
    in_launch = ranks is not None and ranks.num_processes > 1
    speaks = ranks is None or ranks.is_main_process
    if not speaks:
        logging.getLogger().setLevel(logging.WARNING)  # one process tells the story
    try:
        if launcher:
            result = launch_round(settings, args.trigger, url=_database(settings), launcher=launcher)
        else:
            _stop_on_sigterm(interrupted=not in_launch)
            url = _database(settings) if ranks.is_main_process else None  # the others never touch it
            result = run_round(settings, args.trigger, url=url)
    except RoundAlreadyRunning as exc:
        code = _fail(args, speaks, "busy", str(exc), EXIT_BUSY)
        return EXIT_OK if in_launch else code
    except (RoundFailed, LaunchFailed) as exc:
        where = f" (see retrain_runs row {exc.run_id})" if exc.run_id is not None else ""
        return _fail(args, speaks, "failed", f"{exc}{where}", EXIT_FAILED, run_id=exc.run_id)
    code = EXIT_BY_STATUS[result.status]
    if speaks:
        document = {**result.to_json(), "breakdown": _parts(result.timings), "exit_code": code}
        if args.result_file or args.json:
            _emit(args, document)
        else:
            render(Console(soft_wrap=False, width=None if sys.stdout.isatty() else 120), result)
    return EXIT_OK if in_launch else code


def _emit(args, document: dict) -> None:
    """The result's JSON document: to --result-file (written whole, then renamed), or stdout."""
    text = json.dumps(document, indent=2, default=str)
    if getattr(args, "result_file", None):
        staging = args.result_file.with_name(args.result_file.name + ".tmp")
        staging.write_text(text)
        staging.replace(args.result_file)
    else:
        print(text)


def _fail(args, speaks: bool, code: str, message: str, exit_code: int, **extra) -> int:
    if speaks and (getattr(args, "json", False) or getattr(args, "result_file", None)):
        _emit(args, {"error": code, "message": message, **extra, "exit_code": exit_code})
    print(f"error: {message}", file=sys.stderr)
    return exit_code


def _stop_on_sigterm(interrupted: bool) -> None:
    """SIGTERM ends the round at once, and it removes what it wrote. Run on its own (`kill`, a
    service manager), the round records itself 'interrupted' (serving untouched). Inside a
    launch of several processes the launcher sends SIGTERM to stop the others when one of them
    failed, so there the round records itself failed. A second SIGTERM ends the process at
    once."""
    from .runs import RECORDING_OUTCOME, RoundInterrupted, request_stop

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        # Not while the round writes its outcome: that finishes, and the process ends after it.
        # (Not "not inside an except block" either: code the round runs, an import's fallback
        # say, handles exceptions all the time, and a signal there would be lost.)
        if not RECORDING_OUTCOME.is_set():
            if interrupted:
                # Should library code swallow the exception (a `except BaseException`, a
                # finaliser: once in the full suite a round ran on to the end), the round still
                # stops as its next stage begins.
                request_stop(signum)
            raise RoundInterrupted(signum) if interrupted else SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, stop)


def _stop_serving_on_sigterm(scheduler) -> None:
    """`serve` runs rounds in a worker thread, which a signal cannot interrupt: SIGTERM asks the
    running round to stop at its next stage (recorded 'interrupted') and shuts the scheduler
    down (no new rounds), waiting for that round; then `scheduler.start()` returns. The shutdown
    runs in a thread of its own, not in the handler: the handler interrupts the scheduler's
    thread, possibly inside one of its locks. A second SIGTERM ends the process at once."""
    import threading

    from .runs import request_stop

    def shut_down() -> None:
        from apscheduler.schedulers import SchedulerNotRunningError

        for _ in range(200):  # a signal just before start(): wait until it runs
            try:
                scheduler.shutdown(wait=True)
                return
            except SchedulerNotRunningError:
                time.sleep(0.05)

    def stop(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        request_stop(signum)
        threading.Thread(target=shut_down, name="stop-scheduler", daemon=True).start()

    signal.signal(signal.SIGTERM, stop)


def _parts(timings: dict) -> dict:
    from .round import totals_by_part

    return {**totals_by_part(timings), "total": timings.get("total")}


def render(out: Console, result) -> None:
    """The time breakdown, then the decision: what a person running a round wants to see."""
    from .round import breakdown, totals_by_part

    total = result.timings.get("total") or sum(result.timings.values()) or 1.0
    table = Table(title=f"retrain run {result.run_id}: where the time went", title_justify="left")
    table.add_column("stage")
    table.add_column("part")
    table.add_column("seconds", justify="right")
    table.add_column("share", justify="right")
    for stage, part, seconds in breakdown(result.timings):
        table.add_row(stage, part, f"{seconds:.1f}", f"{seconds / total:.0%}")
    table.add_section()
    for part, seconds in sorted(totals_by_part(result.timings).items(), key=lambda kv: -kv[1]):
        table.add_row(f"[bold]{part}[/]", "", f"{seconds:.1f}", f"{seconds / total:.0%}")
    table.add_row("[bold]total[/]", "", f"{total:.1f}", "100%")
    out.print(table)

    m, c = result.metrics, result.counts
    if result.status == "skipped":
        out.print(f"[yellow]skipped[/]: {result.reason}")
        return
    reward = m.get("reward", {})
    accuracy = reward.get("eval_accuracy")
    out.print(
        f"data: {c.get('reward_pairs', 0)} pairs + {c.get('reward_thumbs', 0)} thumbs for the reward model "
        f"({c.get('held_out_pairs', 0)} pairs held out), {c.get('ppo_prompts', 0)} PPO prompts, "
        f"{c.get('gate_prompts_used', 0)} gate prompts"
    )
    out.print(
        "reward model: held-out accuracy "
        + (f"{accuracy:.3f}" if accuracy is not None else "n/a (no held-out pairs)")
        + (f", warm start from {reward['warm_started_from']}" if reward.get("warm_started_from") else ", fresh")
    )
    last = m.get("ppo", {}).get("last", {})
    if last:
        out.print(f"ppo: {len(m['ppo']['iterations'])} iteration(s), last: score {last['score_mean']:+.3f}, "
                  f"KL {last['kl']:.3f} nats, entropy {last.get('entropy', float('nan')):.3f}, "
                  f"length {last['response_length']:.1f}, EOS rate {last['eos_rate']:.2f}")
    budget = m.get("ppo", {}).get("kl_budget") or {}
    limit = budget.get("limit") or budget.get("max_kl") or math.nan
    if budget.get("backtracks"):
        steps = budget["backtracks"]
        over = ", ".join(f"{step['kl']:.2f}" for step in steps)
        out.print(f"ppo stepped back {len(steps)} time(s) from an update over its KL budget ({over} nats > "
                  f"{limit:.2f}), on at learning rate {steps[-1]['learning_rate']:.3g}")
    if budget.get("stopped_at") is not None:
        kept = budget["kept_iteration"]
        why = (f"{budget['final_greedy_repetitive_rate']:.0%} of its greedy answers loop after the last update"
               if budget.get("stop_reason") == "loops" else
               f"KL budget: {budget['stop_kl']:.2f} nats measured at iteration {budget['stopped_at']}, "
               f"over {limit:.2f}")
        out.print(f"[yellow]ppo stopped[/]: {why}: the candidate is "
                  + (f"the weights iteration {kept} started from" if kept is not None else "the serving policy"))
    elif budget.get("final_kl") is not None:
        out.print(f"ppo's KL budget: {budget['final_kl']:.2f} nats after the last update, within {limit:.2f}")
    style = "green" if result.status == "succeeded" else "red"
    out.print(f"[{style}]{result.reason}[/]")
    if result.candidate_id is None:  # PPO kept no update: nothing was registered
        return
    verb = "registered as a candidate" if result.status == "succeeded" else "registered as rejected"
    promotion = m.get("promotion")
    line = f"checkpoint {result.candidate_id} {verb}"
    if promotion:
        line += "; promoted: now serving" if promotion["promoted"] else f"; not promoted: {promotion['reason']}"
    out.print(line)


def cmd_serve(args, settings) -> int:
    from .launch import inside_launch, launch_round
    from .round import run_round
    from .scheduler import build_scheduler

    if inside_launch():
        return _fail(args, True, "usage", "`serve` runs one scheduler: start it as a plain process and set "
                     "RETRAIN_LAUNCHER (e.g. 'accelerate launch --num_processes 4') to run each round as a launch",
                     EXIT_USAGE)
    url = _database(settings)
    if settings.retrain_launcher:
        def round_fn(trigger: str):
            return launch_round(settings, trigger, url=url, launcher=settings.retrain_launcher)
    else:
        def round_fn(trigger: str):
            return run_round(settings, trigger, url=url)
    try:
        scheduler = build_scheduler(
            url,
            round_fn,
            interval_minutes=settings.retrain_interval_minutes,
            cron=settings.retrain_cron,
            min_new_feedback=settings.retrain_min_new_feedback,
            min_new_edits=settings.retrain_min_new_edits,
            feedback_check_seconds=settings.retrain_feedback_check_seconds,
        )
    except ValueError as exc:
        return _fail(args, False, "usage", str(exc), EXIT_USAGE)
    # apscheduler logs every run of the feedback watcher at INFO: once a minute, forever.
    logging.getLogger("apscheduler.executors.default").setLevel(logging.WARNING)
    from .runs import STOP_REQUESTED, request_stop

    _stop_serving_on_sigterm(scheduler)
    log.info("retraining scheduler: %s", ", ".join(str(job.trigger) for job in scheduler.get_jobs()))
    try:
        if not STOP_REQUESTED.is_set():
            scheduler.start()  # returns once SIGTERM's shutdown is done
    except KeyboardInterrupt:
        request_stop(signal.SIGINT)  # Ctrl-C: a running round stops at its next stage
        log.info("scheduler stopping: waiting for a running round to stop at its next stage")
        scheduler.shutdown(wait=True)
    log.info("scheduler stopped")
    return EXIT_OK


def cmd_config(args, settings) -> int:
    config = settings.retrain_config()
    if args.json:
        print(json.dumps(config.to_json(), indent=2, default=str))
        return EXIT_OK
    table = Table(title="retraining config (set with RETRAIN_* variables or RETRAIN_CONFIG_FILE)", title_justify="left")
    table.add_column("field", no_wrap=True)
    table.add_column("value")
    table.add_column("meaning", overflow="fold")
    for name, value, help_text in config.describe():
        table.add_row(name, repr(value), help_text)
    Console(width=None if sys.stdout.isatty() else 160).print(table)  # piped: do not squeeze
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
