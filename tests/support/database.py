"""A database of one's own on a PostgreSQL server: for tests and benchmarks (bench/ imports
it through bench/harness.py), never for the product, which works in the database it is given."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg
from psycopg.conninfo import conninfo_to_dict, make_conninfo

from feedback.migrate import migrate


@contextmanager
def scratch_database(admin_url: str, prefix: str, *, migrated: bool = True) -> Iterator[str]:
    """A new database on `admin_url`'s server (`prefix` and a random suffix), migrated unless
    `migrated` is false, dropped with its connections on exit: where a test or a benchmark
    works when it must see every row and no one else's."""
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_conninfo(**{**conninfo_to_dict(admin_url), "dbname": name})
    try:
        if migrated:
            migrate(url)
        yield url
    finally:
        with psycopg.connect(admin_url, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
