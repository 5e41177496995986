"""`python -m feedback export --sft`: demonstrations in TRL's conversational SFT format, with
their context path, honouring allow_data_use, loaded by `datasets` and trained on by TRL's
SFTTrainer unchanged (a few steps on the tiny model)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest

from feedback import store
from feedback.export import export_demonstrations
from support.tiny_model import tiny_model_dir  # noqa: F401 - the session fixture

MODEL = "test-policy-v1"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
async def demos_db(own_db_url) -> str:
    """Two demonstrations (one deep in a conversation), one repeated text, one opted out, and
    feedback that is no demonstration (a thumb, a comparison, an edited question)."""
    async with await psycopg.AsyncConnection.connect(own_db_url) as conn:
        alice = await store.user_for_token(conn, "alice-sft")

        async def exchange(question: str, answer: str, *, allow=True, parent=None, chat=None):
            chat = chat or await store.create_conversation(conn, alice, allow_data_use=allow)
            if parent is None:
                parent = await store.add_message(conn, alice, chat.id, None, "system", "Be kind.")
            q = await store.add_message(conn, alice, chat.id, parent.id, "user", question)
            a = await store.add_message(conn, alice, chat.id, q.id, "assistant", answer, model_version=MODEL)
            return chat, q, a

        chat, q1, a1 = await exchange("Capital of France?", "Lyon")
        await store.record_demonstration(conn, alice, a1.id, "Paris. Have you been?")
        # Deeper: the context holds the earlier turns (the model's own answer included).
        _, q2, a2 = await exchange("And of Italy?", "Milan", chat=chat, parent=a1)
        await store.record_demonstration(conn, alice, a2.id, "Rome.")
        # The same prompt and text in another conversation: written once.
        _, _, again = await exchange("Capital of France?", "Nice")
        await store.record_demonstration(conn, alice, again.id, "Paris. Have you been?")
        # Opted out: never written.
        _, _, hidden = await exchange("SECRET question", "SECRET answer", allow=False)
        await store.record_demonstration(conn, alice, hidden.id, "SECRET demonstration")
        # Not demonstrations.
        _, q3, a3 = await exchange("Say hi", "Hi!")
        await store.record_rating(conn, alice, a3.id, 1)
        await store.edit_question(conn, alice, q3.id, "Say hello")
    return own_db_url


EXPECTED = [
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Paris. Have you been?"}],
    [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Capital of France?"},
     {"role": "assistant", "content": "Lyon"}, {"role": "user", "content": "And of Italy?"},
     {"role": "assistant", "content": "Rome."}],
]


def test_export_sft_command_writes_the_demonstrations_with_their_context(demos_db, tmp_path):
    out = tmp_path / "sft.jsonl"
    env = {**os.environ, "DATABASE_URL": demos_db, "DATA_DIR": str(tmp_path / "var")}
    done = subprocess.run(
        [sys.executable, "-m", "feedback", "export", "--sft", "--out", str(out)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "wrote 2 demonstrations" in done.stdout
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(set(line) == {"messages"} for line in lines)
    assert sorted((line["messages"] for line in lines), key=len) == EXPECTED
    assert "SECRET" not in out.read_text()


def test_with_ids_names_the_rows(demos_db, tmp_path):
    out = tmp_path / "sft-ids.jsonl"
    with psycopg.connect(demos_db) as conn:
        counts = export_demonstrations(conn, out, with_ids=True)
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        for line in lines:
            row = conn.execute(
                "SELECT content, edited_from, author_id FROM messages WHERE id = %s", (line["message_id"],)
            ).fetchone()
            assert row[0] == line["messages"][-1]["content"] and str(row[1]) == line["edited_from"]
            assert row[2] is not None and len(line["prompt_ids"]) == len(line["messages"]) - 1
    assert counts.demonstrations == len(lines) == 2


def test_sft_trainer_trains_on_the_export_unchanged(demos_db, tmp_path, tiny_model_dir):  # noqa: F811
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    out = tmp_path / "sft.jsonl"
    with psycopg.connect(demos_db) as conn:
        export_demonstrations(conn, out)
    dataset = load_dataset("json", data_files=str(out), split="train", cache_dir=str(tmp_path / "cache"))
    assert dataset.column_names == ["messages"] and len(dataset) == 2

    trainer = SFTTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_model_dir),
        processing_class=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=dataset,
        args=SFTConfig(
            output_dir=str(tmp_path / "sft"), max_steps=3, per_device_train_batch_size=2,
            learning_rate=1e-3, logging_steps=1, save_strategy="no", report_to=[], use_cpu=True,
            max_length=256, dataloader_num_workers=0,
            bf16=False,  # SFTConfig turns bf16 on by default; the tiny model trains in float32
        ),
    )
    try:
        result = trainer.train()
    finally:
        # The Trainer leaves accelerate's process-wide state set up with its mixed precision;
        # the retraining code later in this process makes Accelerators of its own.
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    assert result.global_step == 3
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]  # it learns: the same two examples, three steps
