"""`python -m deploy ...`: the operators' deploy script.

Exit codes: 0 done (or already so), 1 other failure (e.g. the database is unreachable),
2 usage, 3 checkpoint not found, 4 refused (pinned, rejected, corrupt, not allowed from its
status). `--json` prints one JSON document on stdout (an error too: {"error", "message"});
logs go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any

import psycopg
from rich.console import Console
from rich.table import Table

from feedback.db import database_url
from feedback.logs import configure_logging
from feedback.migrate import migrate

from . import canary as canary_module
from . import endpoints, registry
from .errors import EXIT_NOT_FOUND, EXIT_OK, EXIT_OTHER, EXIT_REFUSED, EXIT_USAGE, DeployError
from .registry import Checkpoint, CheckpointEvent, Transition
from .settings import DeploySettings

log = logging.getLogger("deploy")


STATUS_STYLE = {
    "serving": "bold green", "canary": "yellow", "candidate": "cyan", "retired": "dim",
    "rejected": "red",
}


def build_parser() -> argparse.ArgumentParser:
    # Options every command takes, before or after the command name. SUPPRESS: an option given
    # before the command is not overwritten by the subcommand's default.
    common = argparse.ArgumentParser(add_help=False, argument_default=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    common.add_argument("--actor", help="who does this (recorded); default $USER@hostname")
    common.add_argument("--reason", help="why (recorded with the change)")

    parser = argparse.ArgumentParser(
        prog="python -m deploy", parents=[common],
        description="Flywheel's checkpoint registry: what serves, canaries, rollback, pin.",
        epilog="Exit codes: 0 ok, 1 other error, 2 usage, 3 not found, 4 refused.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return commands.add_parser(name, parents=[common], help=help, description=help)

    command("status", "what serves, the canary, the pin, recent changes")
    listing = command("list", "registered checkpoints, serving and canary first")
    listing.add_argument("--status", choices=registry.STATUSES)
    listing.add_argument("--limit", type=int)
    show = command("show", "one checkpoint with its history")
    show.add_argument("id")
    reg = command("register", "register a checkpoint directory (reads its manifest.json)")
    reg.add_argument("path")
    reg.add_argument("--rejected", action="store_true", help="register it as rejected (give --reason)")
    command("promote", "serve ID (a candidate, the canary or a retired one)").add_argument("id")
    command("rollback", "serve the checkpoint that served before the current one")
    pin = command("pin", "serve ID (default: the serving one) and stop automatic changes")
    pin.add_argument("id", nargs="?")
    command("unpin", "allow automatic promotion again")
    can = command("canary", "give PERCENT of new conversations to ID (0 aborts the canary)")
    can.add_argument("id")
    can.add_argument("percent", type=_percent)
    command("canary-abort", "end the canary; new conversations all get the serving policy")
    report = command("canary-report", "live thumbs-up rates of canary vs serving, and the decision")
    report.add_argument("--apply", action="store_true",
                        help="promote or abort when decisive (also when CANARY_AUTO=true)")
    command("retire", "take a candidate or the canary out of consideration").add_argument("id")
    command("reject", "mark ID as never to be served (needs --reason)").add_argument("id")
    engine = command("engine-url", "send the remote engines' new requests to URL (blue/green); "
                                   "no URL: where they are asked to go and where they went")
    engine.add_argument("url", nargs="?", type=_engine_url,
                        help="the engine's base URL as the servers reach it, e.g. http://engine-green:8000")
    engine.add_argument("--replica", help="only this replica (its name in /api/version: "
                                          "REPLICA_NAME, else hostname:port); default every one")
    return parser


def _engine_url(text: str) -> str:
    try:
        return endpoints.check_url(text)
    except endpoints.InvalidEngineUrl as exc:
        raise argparse.ArgumentTypeError(exc.message) from None


def _percent(text: str) -> float:
    try:
        value = float(text.rstrip("%"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a percentage such as 10 or 2.5") from None
    if not 0 <= value <= 100:
        raise argparse.ArgumentTypeError(f"{text} is not within 0..100")
    return value


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on usage errors
    if args.command == "engine-url" and getattr(args, "replica", None) and not args.url:
        parser.error("engine-url --replica needs the URL to send that replica to")
    as_json = getattr(args, "json", False)
    actor = getattr(args, "actor", None) or registry.default_actor()
    reason = getattr(args, "reason", None)
    if args.command == "reject" and not reason:
        parser.error("reject needs --reason: say what is wrong with it")
    if getattr(args, "rejected", False) and not reason:
        parser.error("register --rejected needs --reason: say why it failed")

    configure_logging()
    out = Console(soft_wrap=False, width=_width())
    settings = DeploySettings()
    try:
        url = database_url(settings)
        migrate(url)  # idempotent; a fresh DATA_DIR works with the deploy script alone
        with registry.connect(url) as conn:
            result = COMMANDS[args.command](conn, args, actor, reason, settings)
    except DeployError as exc:
        return _fail(out, as_json, exc.code, exc.message, exc.exit_code)
    except psycopg.OperationalError as exc:
        return _fail(out, as_json, "database_unreachable",
                     f"cannot reach the database ({exc}); check DATABASE_URL / DATA_DIR", EXIT_OTHER)
    except Exception as exc:  # noqa: BLE001 - a deploy script reports, it does not trace back
        log.debug("failed", exc_info=True)
        return _fail(out, as_json, "error", f"{type(exc).__name__}: {exc}", EXIT_OTHER)

    if as_json:
        print(json.dumps(result.json, indent=2, default=str))
    else:
        result.render(out)
    return result.exit_code


def _width() -> int | None:
    import os
    import shutil

    if "COLUMNS" in os.environ or sys.stdout.isatty():
        return None
    return max(120, shutil.get_terminal_size((120, 24)).columns)  # piped: do not squeeze tables


def _fail(out: Console, as_json: bool, code: str, message: str, exit_code: int) -> int:
    if as_json:
        print(json.dumps({"error": code, "message": message}))
    # Plain, unwrapped: error messages get copied into tickets and grepped.
    print(f"error: {message}", file=sys.stderr)
    return exit_code


class Result:
    """What a command produced: a JSON document and a way to render it for people."""

    def __init__(self, json_doc: Any, render: Callable[[Console], None], exit_code: int = EXIT_OK):
        self.json = json_doc
        self.render = render
        self.exit_code = exit_code


# ---------------------------------------------------------------------------------------------
# Commands.


def cmd_status(conn, args, actor, reason, settings) -> Result:
    st = registry.status(conn)
    switch_failures = [e for e in endpoints.outcomes(conn, st.state) if e.action == endpoints.FAILED]

    def render(out: Console) -> None:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("serving", _policy_line(st.serving) if st.serving else "[red]nothing[/red]")
        grid.add_row("canary", (f"{_policy_line(st.canary)}  [yellow]{st.state.canary_percent:g}% "
                                "of new conversations[/yellow]") if st.canary else "none")
        grid.add_row("pinned", f"[magenta]{st.state.pinned_id}[/magenta] by {st.pinned_by} "
                     f"at {_when(st.pinned_at)}" + (f" ({st.pin_reason})" if st.pin_reason else "")
                     if st.state.pinned_id else "no")
        grid.add_row("candidates", str(st.candidates))
        grid.add_row("engine url", _endpoints_line(st.state))
        out.print(grid)
        if st.load_failures:
            out.print(_events_table(st.load_failures, "replicas that failed to load a live version"))
        if switch_failures:
            out.print(_endpoint_table(switch_failures, "replicas that failed to switch engine url"))
        if st.recent_events:
            out.print(_events_table(st.recent_events, "recent changes"))

    doc = {**st.to_json(), "engine_endpoints": [e.to_json() for e in st.state.engine_endpoints],
           "engine_switch_failures": [e.to_json() for e in switch_failures]}
    return Result(doc, render)


def cmd_list(conn, args, actor, reason, settings) -> Result:
    rows = registry.list_checkpoints(conn, status=getattr(args, "status", None),
                                     limit=getattr(args, "limit", None))

    def render(out: Console) -> None:
        if not rows:
            out.print("no checkpoints registered yet (a server registers its base model at start)")
            return
        table = Table(title="checkpoints", title_justify="left")
        table.add_column("id", no_wrap=True)
        table.add_column("status", no_wrap=True)
        for name in ("kind", "parent", "created", "promoted", "metrics", "reason"):
            table.add_column(name, overflow="fold")
        for ck in rows:
            status = ck.status + (f" {ck.canary_percent:g}%" if ck.canary_percent else "")
            table.add_row(
                ck.id, f"[{STATUS_STYLE[ck.status]}]{status}[/]", ck.kind, ck.parent_id or "-",
                _when(ck.created_at, seconds=False),
                f"{_when(ck.promoted_at, seconds=False)} {ck.promoted_by}" if ck.promoted_at else "-",
                _metrics_line(ck.metrics), ck.reason or "",
            )
        out.print(table)

    return Result([ck.to_json() for ck in rows], render)


def cmd_show(conn, args, actor, reason, settings) -> Result:
    ck = registry.get(conn, args.id)
    history = registry.events(conn, args.id, limit=100)

    def render(out: Console) -> None:
        out.print(_policy_line(ck))
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column(overflow="fold")
        for name, value in (("path", ck.path), ("base model", ck.base_model),
                            ("parent", ck.parent_id or "-"), ("created", _when(ck.created_at)),
                            ("metrics", json.dumps(ck.metrics, default=str)),
                            ("reason", ck.reason or "")):
            grid.add_row(name, value)
        out.print(grid)
        out.print(_events_table(history, "history"))

    return Result({**ck.to_json(), "events": [e.to_json() for e in history]}, render)


def cmd_register(conn, args, actor, reason, settings) -> Result:
    status = "rejected" if getattr(args, "rejected", False) else "candidate"
    ck = registry.register(conn, args.path, actor=actor, reason=reason, status=status)
    return Result(ck.to_json(), lambda out: out.print(f"registered {_policy_line(ck)}"))


def _transition(tr: Transition, done: str, already: str) -> Result:
    def render(out: Console) -> None:
        out.print(done if tr.changed else f"[dim]{already}; nothing changed[/dim]", highlight=False)

    return Result(tr.to_json(), render)


def cmd_promote(conn, args, actor, reason, settings) -> Result:
    tr = registry.promote(conn, args.id, actor=actor, reason=reason)
    return _transition(tr, f"[green]promoted[/green] {tr.checkpoint_id} (was {tr.previous_id})",
                       f"{tr.checkpoint_id} is already serving")


def cmd_rollback(conn, args, actor, reason, settings) -> Result:
    tr = registry.rollback(conn, actor=actor, reason=reason)
    return _transition(tr, f"[green]rolled back[/green] to {tr.checkpoint_id} "
                           f"(from {tr.previous_id}, now retired)", "")


def cmd_pin(conn, args, actor, reason, settings) -> Result:
    tr = registry.pin(conn, args.id, actor=actor, reason=reason)
    promoted = " (promoted it first)" if tr.details.get("promoted") else ""
    return _transition(tr, f"[magenta]pinned[/magenta] {tr.checkpoint_id}{promoted}: no automatic "
                           "promotion until `python -m deploy unpin`",
                       f"{tr.checkpoint_id} is already pinned")


def cmd_unpin(conn, args, actor, reason, settings) -> Result:
    tr = registry.unpin(conn, actor=actor, reason=reason)
    return _transition(tr, f"unpinned {tr.checkpoint_id}: automatic promotion allowed again",
                       "nothing is pinned")


def cmd_canary(conn, args, actor, reason, settings) -> Result:
    tr = registry.canary(conn, args.id, args.percent, actor=actor, reason=reason)
    if tr.action == "canary_abort":
        return _transition(tr, f"aborted the canary {tr.checkpoint_id}", "no canary is running")
    return _transition(tr, f"[yellow]canary[/yellow] {tr.checkpoint_id} gets {args.percent:g}% of "
                           "new conversations (`python -m deploy canary-report` to follow it)",
                       f"{tr.checkpoint_id} already gets {args.percent:g}%")


def cmd_canary_abort(conn, args, actor, reason, settings) -> Result:
    tr = registry.abort_canary(conn, actor=actor, reason=reason)
    return _transition(tr, f"aborted the canary {tr.checkpoint_id}; it is a candidate again",
                       "no canary is running")


def cmd_canary_report(conn, args, actor, reason, settings) -> Result:
    report = canary_module.canary_decide(
        conn, actor=actor, confidence=settings.canary_confidence,
        min_ratings=settings.canary_min_ratings,
        apply=getattr(args, "apply", False) or settings.canary_auto,
    )

    def render(out: Console) -> None:
        if report.decision == "no_canary":
            out.print(report.explanation)
            return
        table = Table(title=f"canary {report.canary_id} at {report.percent:g}% since "
                            f"{_when(report.since)}", title_justify="left")
        for name in ("version", "role", "thumbs up", "thumbs down", "rate",
                     f"{report.confidence:.0%} interval"):
            table.add_column(name)
        for v in report.versions:
            table.add_row(v.version, v.role, str(v.up), str(v.down),
                          f"{v.rate:.1%}" if v.rate is not None else "-",
                          f"[{v.low:.1%}, {v.high:.1%}]")
        out.print(table)
        style = {"promote": "green", "abort": "red"}.get(report.decision, "yellow")
        out.print(f"[{style}]{report.decision}[/]: {report.explanation}", highlight=False)
        if report.action_taken:
            out.print(f"action: {report.action_taken}", highlight=False)

    return Result(report.to_json(), render)


def cmd_retire(conn, args, actor, reason, settings) -> Result:
    tr = registry.retire(conn, args.id, actor=actor, reason=reason)
    return _transition(tr, f"retired {tr.checkpoint_id}", f"{tr.checkpoint_id} is already out")


def cmd_reject(conn, args, actor, reason, settings) -> Result:
    tr = registry.reject(conn, args.id, reason, actor=actor)
    return _transition(tr, f"[red]rejected[/red] {tr.checkpoint_id}",
                       f"{tr.checkpoint_id} is already rejected")


def cmd_engine_url(conn, args, actor, reason, settings) -> Result:
    if args.url is None:
        return _engine_url_report(conn)
    replica = getattr(args, "replica", None)
    request, state = endpoints.request_switch(conn, args.url, actor=actor, reason=reason, replica=replica)

    def render(out: Console) -> None:
        who = f"replica {replica}" if replica else "every replica"
        out.print(f"asked {who} to send new requests to [bold]{request.url}[/bold] once "
                  f"{'it' if replica else 'each'} has checked that it answers "
                  "(`python -m deploy engine-url` shows who switched)", highlight=False)

    return Result({"request": request.to_json(), "state": state.to_json()}, render)


def _engine_url_report(conn) -> Result:
    state = registry.read_state(conn)
    outcomes = endpoints.outcomes(conn, state)
    history = endpoints.events(conn, limit=20)

    def render(out: Console) -> None:
        out.print(f"asked for: {_endpoints_line(state)}", highlight=False)
        if outcomes:
            out.print(_endpoint_table(outcomes, "replicas' outcomes for the requests in force"))
        if history:
            out.print(_endpoint_table(history, "history"))

    doc = {"engine_endpoints": [e.to_json() for e in state.engine_endpoints],
           "outcomes": [e.to_json() for e in outcomes], "events": [e.to_json() for e in history]}
    return Result(doc, render)


COMMANDS: dict[str, Callable[..., Result]] = {
    "status": cmd_status, "list": cmd_list, "show": cmd_show, "register": cmd_register,
    "promote": cmd_promote, "rollback": cmd_rollback, "pin": cmd_pin, "unpin": cmd_unpin,
    "canary": cmd_canary, "canary-abort": cmd_canary_abort, "canary-report": cmd_canary_report,
    "retire": cmd_retire, "reject": cmd_reject, "engine-url": cmd_engine_url,
}


# ---------------------------------------------------------------------------------------------
# Rendering helpers.


def _when(value, seconds: bool = True) -> str:
    return value.strftime("%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M") if value else "-"


def _policy_line(ck: Checkpoint) -> str:
    style = STATUS_STYLE.get(ck.status, "")
    return f"[{style}]{ck.id}[/] ({ck.kind}, {ck.status}; base {ck.base_model})"


def _metrics_line(metrics: dict[str, Any], limit: int = 3) -> str:
    shown = [(k, v) for k, v in metrics.items() if isinstance(v, (int, float))][:limit]
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown)


def _events_table(rows: list[CheckpointEvent], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("when", "checkpoint", "action", "actor", "reason"):
        table.add_column(name, overflow="fold")
    for e in rows:
        table.add_row(_when(e.created_at), e.checkpoint_id, e.action, e.actor, e.reason or "")
    return table


def _endpoints_line(state) -> str:
    if not state.engine_endpoints:
        return "not set (every remote engine uses its ENGINE_URL)"
    return "; ".join(f"{e.url} for {e.replica or 'every replica'} (by {e.actor} at {_when(e.at)}"
                     + (f": {e.reason}" if e.reason else "") + ")" for e in state.engine_endpoints)


def _endpoint_table(rows: list[endpoints.EndpointEvent], title: str) -> Table:
    table = Table(title=title, title_justify="left")
    for name in ("when", "action", "replica", "url", "actor", "reason"):
        table.add_column(name, overflow="fold")
    style = {endpoints.FAILED: "red", endpoints.SWITCHED: "green"}
    for e in rows:
        table.add_row(_when(e.created_at), f"[{style.get(e.action, 'bold')}]{e.action}[/]",
                      e.replica or ("every replica" if e.action == endpoints.REQUEST else ""),
                      e.url, e.actor, e.reason or "")
    return table
