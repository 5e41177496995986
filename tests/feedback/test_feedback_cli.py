"""`python -m feedback`: subcommands, help, and the migrate command on a real database."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from feedback.__main__ import build_parser
from feedback.migrate import applied_versions, available

ROOT = Path(__file__).resolve().parents[2]


def test_migrate_command_brings_an_empty_database_up_to_date(empty_db_url, tmp_path):
    env = {**os.environ, "DATABASE_URL": empty_db_url, "DATA_DIR": str(tmp_path / "var")}
    done = subprocess.run(
        [sys.executable, "-m", "feedback", "migrate"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "applied 0001_init" in done.stdout
    assert applied_versions(empty_db_url) == [m.version for m in available()]


def test_a_command_is_required_and_export_needs_out():
    parser = build_parser()
    for argv in ([], ["export"]):
        with pytest.raises(SystemExit):
            parser.parse_args(argv)
    assert parser.parse_args(["export", "--out", "x.jsonl"]).out == Path("x.jsonl")


async def test_add_user_issues_a_token_that_finds_its_user_and_only_its_hash_is_stored(db_url, tmp_path):
    import psycopg

    from feedback import store

    env = {**os.environ, "DATABASE_URL": db_url, "DATA_DIR": str(tmp_path / "var")}
    done = subprocess.run(
        [sys.executable, "-m", "feedback", "add-user", "--name", "ops-alice"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    token = done.stdout.split("token ")[1].strip()

    async with await psycopg.AsyncConnection.connect(db_url) as conn:
        user = await store.find_user(conn, token)
        assert user is not None and user.name == "ops-alice"
        assert await store.find_user(conn, token + "x") is None
        stored = await (await conn.execute(
            "SELECT count(*) FROM users WHERE token_hash::text LIKE %s", (f"%{token}%",)
        )).fetchone()
        assert stored == (0,)
