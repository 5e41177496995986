"""The registry's database for deploy tests: one per test module (the registry's state is
global, so modules must not share it), reset before each test that takes `conn`."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest
from support.database import scratch_database

from deploy import registry
from deploy_testkit import RESET_SQL


@pytest.fixture(scope="module")
def registry_url(admin_url, request) -> Iterator[str]:
    """A migrated database for this test module alone, named after it."""
    name = request.module.__name__.rsplit(".", 1)[-1].removeprefix("test_")
    with scratch_database(admin_url, f"flywheel_{name}") as url:
        yield url


@pytest.fixture
def conn(registry_url) -> Iterator[psycopg.Connection]:
    """A registry connection on a reset registry (no checkpoints, no users, nothing serving)."""
    with registry.connect(registry_url) as c:
        c.execute(RESET_SQL)
        yield c
