"""`python -m feedback migrate | export [--sft] --out FILE | add-user`: the store's command line.

Reads the same environment as every Flywheel command (DATA_DIR, DATABASE_URL; see the README).
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path

import psycopg

from .db import database_url
from .export import export_demonstrations, export_preferences
from .migrate import migrate
from .settings import StoreSettings
from .store import hash_token


def _migrate(args: argparse.Namespace) -> int:
    applied = migrate(database_url(StoreSettings()))
    if applied:
        for migration in applied:
            print(f"applied {migration.version:04d}_{migration.name}")
    else:
        print("database is up to date")
    return 0


def _export(args: argparse.Namespace) -> int:
    if args.sft:
        with psycopg.connect(database_url(StoreSettings())) as conn:
            sft = export_demonstrations(conn, args.out, with_ids=args.with_ids)
        print(f"wrote {sft.demonstrations} demonstrations to {args.out}")
        return 0
    with psycopg.connect(database_url(StoreSettings())) as conn:
        counts = export_preferences(conn, args.out, with_ids=args.with_ids)
    print(
        f"wrote {counts.written} pairs to {args.out}: {counts.comparison_pairs} from comparisons, "
        f"{counts.thumb_pairs} from opposite thumbs ({counts.duplicates} duplicates skipped)"
    )
    return 0


def _add_user(args: argparse.Namespace) -> int:
    # For servers with ALLOW_ANONYMOUS off: the operator issues each user a token. Only its
    # hash is stored, so this is the one time it can be shown.
    token = secrets.token_urlsafe(32)
    url = database_url(StoreSettings())
    migrate(url)
    with psycopg.connect(url) as conn:
        user_id = conn.execute(
            "INSERT INTO users (token_hash, name) VALUES (%s, %s) RETURNING id",
            (hash_token(token), args.name),
        ).fetchone()[0]
    print(f"user {user_id} ({args.name or 'unnamed'}): token {token}")
    print("give it to the user; it is stored hashed and cannot be shown again", file=sys.stderr)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m feedback",
        description="Flywheel's feedback store: schema migrations and preference export.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    migrate_cmd = commands.add_parser(
        "migrate", help="apply the SQL migrations not yet applied (safe to run again)"
    )
    migrate_cmd.set_defaults(run=_migrate)

    export_cmd = commands.add_parser(
        "export",
        help="write preference pairs (or, with --sft, demonstrations) as JSONL in TRL's "
        "conversational formats",
        description="Write every preference pair (direct comparisons and opposite thumbs among "
        "sibling answers, from conversations that allow data use) as JSONL lines "
        '{"prompt": [...], "chosen": [...], "rejected": [...]}; with --sft, every '
        "demonstration (an answer a user edited into the one they wanted) as "
        '{"messages": [context ..., the demonstrated answer]}, for TRL\'s SFTTrainer.',
    )
    export_cmd.add_argument(
        "--out", type=Path, required=True, metavar="FILE", help="JSONL file to write (replaced)"
    )
    export_cmd.add_argument(
        "--sft",
        action="store_true",
        help="write demonstrations in TRL's conversational SFT format instead of pairs",
    )
    export_cmd.add_argument(
        "--with-ids",
        action="store_true",
        help="also write each pair's source and the ids of the rows it came from",
    )
    export_cmd.set_defaults(run=_export)

    add_user_cmd = commands.add_parser(
        "add-user", help="issue a new user token (for servers with ALLOW_ANONYMOUS off)"
    )
    add_user_cmd.add_argument("--name", default=None, help="a label for the user")
    add_user_cmd.set_defaults(run=_add_user)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=os.environ.get("LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
