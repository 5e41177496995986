"""`python -m feedback export`: TRL's conversational preference format, the right siblings."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from feedback import store
from feedback.export import export_preferences

MODEL = "test-policy-v1"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def pairs_db(own_db_url) -> str:
    """Two comparisons, one thumb pair, a thumb pair repeating a comparison, an opted-out one."""
    async with await psycopg.AsyncConnection.connect(own_db_url) as conn:
        alice = await store.user_for_token(conn, "alice")

        async def exchange(question: str, answers: list[str], *, allow=True):
            chat = await store.create_conversation(conn, alice, allow_data_use=allow)
            system = await store.add_message(conn, alice, chat.id, None, "system", "Be kind.")
            q = await store.add_message(conn, alice, chat.id, system.id, "user", question)
            made = [
                await store.add_message(conn, alice, chat.id, q.id, "assistant", text,
                                        model_version=MODEL)
                for text in answers
            ]
            return made

        good, bad, worse = await exchange("Capital of France?", ["Paris", "Lyon", "Rome"])
        await store.record_comparison(conn, alice, good.id, bad.id, "better")
        await store.record_comparison(conn, alice, worse.id, good.id, "worse")

        up, down = await exchange("Say hi", ["Hi!", "Go away."])
        await store.record_rating(conn, alice, up.id, 1)
        await store.record_rating(conn, alice, down.id, -1)

        # Same texts as the first comparison, judged by thumbs: written once.
        up, down = await exchange("Capital of France?", ["Paris", "Lyon"])
        await store.record_rating(conn, alice, up.id, 1)
        await store.record_rating(conn, alice, down.id, -1)

        hidden_good, hidden_bad = await exchange("SECRET", ["SECRET yes", "SECRET no"],
                                                 allow=False)
        await store.record_comparison(conn, alice, hidden_good.id, hidden_bad.id, "better")
    return own_db_url


def test_export_command_writes_trl_preference_jsonl_that_datasets_loads(pairs_db, tmp_path):
    out = tmp_path / "prefs.jsonl"
    env = {**os.environ, "DATABASE_URL": pairs_db, "DATA_DIR": str(tmp_path / "var")}
    done = subprocess.run(
        [sys.executable, "-m", "feedback", "export", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 3 pairs" in done.stdout and "2 from comparisons, 1 from opposite thumbs" in (
        done.stdout
    ) and "1 duplicates skipped" in done.stdout

    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(row) == {"prompt", "chosen", "rejected"} for row in rows)
    assert {(r["prompt"][-1]["content"], r["chosen"][0]["content"], r["rejected"][0]["content"])
            for r in rows} == {
        ("Capital of France?", "Paris", "Lyon"),
        ("Capital of France?", "Paris", "Rome"),
        ("Say hi", "Hi!", "Go away."),
    }
    assert all(
        r["prompt"] == [{"role": "system", "content": "Be kind."}, r["prompt"][-1]]
        and r["prompt"][-1]["role"] == "user"
        and r["chosen"][0]["role"] == r["rejected"][0]["role"] == "assistant"
        for r in rows
    )

    import datasets

    loaded = datasets.load_dataset(
        "json", data_files=str(out), split="train", cache_dir=str(tmp_path / "hf-cache")
    )
    assert loaded.num_rows == 3 and set(loaded.column_names) == {"prompt", "chosen", "rejected"}
    assert loaded[0]["chosen"][0].keys() == {"role", "content"}


def test_exported_pairs_are_siblings_under_the_prompts_last_message(pairs_db, tmp_path):
    out = tmp_path / "prefs.jsonl"
    with psycopg.connect(pairs_db) as conn:
        counts = export_preferences(conn, out, with_ids=True)
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert counts.written == len(rows) == 3
        for row in rows:
            parents = conn.execute(
                """SELECT m.id, m.parent_id, m.content, m.role FROM messages m
                   WHERE m.id = ANY(%s::uuid[])""",
                ([row["chosen_id"], row["rejected_id"]],),
            ).fetchall()
            by_id = {str(r[0]): r for r in parents}
            chosen, rejected = by_id[row["chosen_id"]], by_id[row["rejected_id"]]
            assert chosen[1] == rejected[1] and str(chosen[1]) == row["prompt_id"]
            assert (chosen[2], rejected[2]) == (
                row["chosen"][0]["content"], row["rejected"][0]["content"]
            )
            assert chosen[3] == rejected[3] == "assistant"
            assert row["source"] in ("comparison", "thumbs") and row["row_ids"]


def test_export_on_an_empty_store_writes_an_empty_file(empty_db_url, tmp_path):
    from feedback.migrate import migrate

    migrate(empty_db_url)
    out = tmp_path / "nested" / "none.jsonl"
    with psycopg.connect(empty_db_url) as conn:
        counts = export_preferences(conn, out)
    assert counts.written == 0 and out.read_text() == ""
