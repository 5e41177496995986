"""Migrations: applied in order, recorded, and a second run is a no-op."""

import psycopg

from feedback.migrate import applied_versions, available, migrate


def _schema_snapshot(url: str) -> list[tuple]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            """SELECT table_name, column_name, data_type FROM information_schema.columns
               WHERE table_schema = 'public' ORDER BY table_name, column_name"""
        ).fetchall()


def test_migrations_apply_once_and_twice_is_a_no_op(empty_db_url):
    first = migrate(empty_db_url)
    assert [m.version for m in first] == [m.version for m in available()]
    snapshot = _schema_snapshot(empty_db_url)

    second = migrate(empty_db_url)

    assert second == []
    assert _schema_snapshot(empty_db_url) == snapshot
    assert applied_versions(empty_db_url) == [m.version for m in available()]


def test_migrations_are_numbered_without_gaps():
    versions = [m.version for m in available()]
    assert versions == list(range(1, len(versions) + 1))


def test_schema_holds_the_facts_the_store_needs(db_url):
    with psycopg.connect(db_url) as conn:
        tables = {
            r[0]
            for r in conn.execute(
                "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
            )
        }
    assert {
        "users", "conversations", "messages", "ratings", "rating_changes", "comparisons",
        "checkpoints", "checkpoint_events", "retrain_runs", "schema_migrations",
    } <= tables
