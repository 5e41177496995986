"""Shared fixtures: a real PostgreSQL database per test run.

`TEST_DATABASE_URL` (CI: the machine's PostgreSQL) is used to create a fresh database for
this run, dropped at the end; without it an embedded pgserver is started in a temporary
directory. Never a mock, never SQLite, never a skip.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from feedback.migrate import migrate


def _admin_url(tmp_path_factory) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    from feedback.db import embedded_url

    return embedded_url(tmp_path_factory.mktemp("embedded-pg"))


@contextmanager
def scratch_database(admin_url: str, prefix: str = "flywheel_test") -> Iterator[str]:
    """Create an empty database on the server of `admin_url`, yield its URL, drop it."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    params = conninfo_to_dict(admin_url)
    params["dbname"] = name
    try:
        yield make_conninfo(**params)
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory) -> str:
    """A URL on which databases can be created (the server the tests use)."""
    return _admin_url(tmp_path_factory)


@pytest.fixture(scope="session")
def db_url(admin_url) -> Iterator[str]:
    """This run's database, migrated. Tests isolate themselves by creating their own users."""
    with scratch_database(admin_url) as url:
        migrate(url)
        yield url


@pytest.fixture
def empty_db_url(admin_url) -> Iterator[str]:
    """A database of its own with no tables, for tests of migrations themselves."""
    with scratch_database(admin_url, prefix="flywheel_empty") as url:
        yield url
