"""Shared fixtures: a real PostgreSQL database per test run.

`TEST_DATABASE_URL` (CI: the machine's PostgreSQL) is used to create a fresh database for
this run, dropped at the end; without it an embedded pgserver is started in a temporary
directory. Never a mock, never SQLite, never a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from support.database import scratch_database


def _admin_url(tmp_path_factory) -> str:
    url = os.environ.get("TEST_DATABASE_URL")
    if url:
        return url
    from feedback.db import embedded_url

    return embedded_url(tmp_path_factory.mktemp("embedded-pg"))


@pytest.fixture(scope="session")
def admin_url(tmp_path_factory) -> str:
    """A URL on which databases can be created (the server the tests use)."""
    return _admin_url(tmp_path_factory)


@pytest.fixture(scope="session")
def db_url(admin_url) -> Iterator[str]:
    """This run's database, migrated. Tests isolate themselves by creating their own users."""
    with scratch_database(admin_url, "flywheel_test") as url:
        yield url


@pytest.fixture
def empty_db_url(admin_url) -> Iterator[str]:
    """A database of its own with no tables, for tests of migrations themselves."""
    with scratch_database(admin_url, "flywheel_empty", migrated=False) as url:
        yield url
