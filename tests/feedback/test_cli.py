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
