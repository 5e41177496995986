"""SFT on demonstrations and liked answers (retrain/sft.py) on the tiny model: loss on the answer
tokens only (a cut answer without its end of turn), the same LoRA adapter PPO trains with the
base as its reference, and a round that fine-tunes on the training side's demonstrations and
liked answers before PPO and records its numbers."""

from __future__ import annotations

import asyncio
import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from uuid import uuid4

import psycopg
import pytest
import torch
from psycopg.rows import dict_row
from transformers import AutoModelForCausalLM, AutoTokenizer

from deploy import checkpoint, registry
from feedback import store
from feedback.training_data import Answer, Demonstration
from retrain.reward_data import is_held_out
from retrain.round import run_round
from retrain.sft import IGNORE, SFTConfig, SFTExample, newest_first, tokenize_demonstration, train_sft
from retrain.ppo import PPOConfig

LENIENT_GATE = {"min_win_rate": -1.0, "min_reward_gain": -1e9, "max_kl": 1e9, "max_empty_rate": 1.0,
                "max_truncated_rate_increase": 1.0, "max_repetitive_rate": 1.0}


def demo(question: str, answer: str) -> Demonstration:
    return Demonstration(
        prompt_id=uuid4(), prompt=[{"role": "user", "content": question}], prompt_ids=[uuid4()],
        answer=Answer(uuid4(), answer, None), edited_from=uuid4(), author_id=1,
        created_at=datetime.now(timezone.utc),
    )


DEMOS = [SFTExample.of_demonstration(demo(f"How do I water plant {n}?", f"Gently, once a week. Is plant {n} indoors?"))
         for n in range(6)]


def test_only_the_answer_and_its_end_of_turn_are_learnt(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    ids, labels = tokenize_demonstration(tokenizer, prompt, "Hello! How are you?")
    context = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=False)
    n_context = len(tokenizer(context, add_special_tokens=False)["input_ids"])
    assert labels[:n_context] == [IGNORE] * n_context
    learnt = [t for t in labels if t != IGNORE]
    assert ids[n_context:] == learnt
    assert tokenizer.decode(learnt) == "Hello! How are you?<|im_end|>"  # stops where the person stopped
    # An answer cut at the token limit: its text is learnt, not a stop in mid-sentence.
    cut_ids, cut_labels = tokenize_demonstration(tokenizer, prompt, "Hello! How are", ended=False)
    assert tokenizer.decode([t for t in cut_labels if t != IGNORE]) == "Hello! How are"
    assert cut_ids[:n_context] == ids[:n_context] and tokenizer.decode(cut_ids[n_context:]) == "Hello! How are"


def test_the_budget_keeps_demonstrations_first_then_the_newest_liked_answers():
    now = datetime.now(timezone.utc)

    def example(source: str, minutes_ago: int) -> SFTExample:
        return SFTExample([{"role": "user", "content": "q"}], source, True, now - timedelta(minutes=minutes_ago), source)

    old_demo, new_demo = example("demonstration:1", 60), example("demonstration:2", 30)
    old_liked, new_liked, newest_liked = example("liked:3", 50), example("liked:4", 10), example("liked:5", 1)
    everything = [old_liked, old_demo, newest_liked, new_demo, new_liked]
    assert newest_first(everything, 3) == [new_demo, old_demo, newest_liked]
    assert newest_first(everything, 1) == [new_demo]
    assert newest_first(everything, None) == everything


def test_sft_lowers_the_answer_loss_of_the_adapter_and_leaves_the_base_as_reference(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    result = train_sft(model, tokenizer, DEMOS, SFTConfig(epochs=4, learning_rate=3e-3, batch_size=3), PPOConfig())
    stats = result.stats
    assert (stats["demonstrations"], stats["liked"], stats["used"], stats["too_long"], stats["steps"]) == (6, 0, 6, 0, 8)
    assert stats["loss_after"] < stats["loss_before"] - 0.5, stats
    assert stats["answer_tokens"] > 6 * 10 and stats["seconds"] > 0

    policy = result.model
    trainable = {name for name, p in policy.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)  # the adapter PPO trains
    ids, _ = tokenize_demonstration(tokenizer, DEMOS[0].prompt, DEMOS[0].answer)
    batch = torch.tensor([ids])
    with torch.no_grad():
        tuned = policy(input_ids=batch).logits
        with policy.disable_adapter():  # PPO's and the gate's reference: the adapter off
            reference = policy(input_ids=batch).logits
        original = base(input_ids=batch).logits
    assert torch.allclose(reference, original, atol=1e-5)
    assert not torch.allclose(tuned, original, atol=1e-3)


def test_too_long_demonstrations_are_left_out_and_none_left_skips(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    result = train_sft(model, tokenizer, DEMOS[:2], SFTConfig(max_tokens=8), PPOConfig())
    assert result.model is model and result.stats["used"] == 0 and result.stats["too_long"] == 2
    assert result.stats["steps"] == 0
    with pytest.raises(ValueError):
        SFTConfig(epochs=0)


async def _demonstrate(url: str, n: int) -> None:
    """On each of `n` seeded conversations: the curt answer edited into the one wanted."""
    async with await psycopg.AsyncConnection.connect(url, row_factory=dict_row) as conn:
        user = await store.user_for_token(conn, "seed-user")
        cur = await conn.execute(
            "SELECT id, content FROM messages WHERE role = 'assistant' AND content LIKE 'Water it.%%' ORDER BY content"
        )
        for row in (await cur.fetchall())[:n]:
            await store.record_demonstration(conn, user, row["id"], row["content"] + " Do you water it daily?")


def test_a_round_fine_tunes_on_training_side_demonstrations_before_ppo(round_db, round_settings, seed_store, tmp_path):
    seed_store(round_db, 10)
    asyncio.run(_demonstrate(round_db, 10))
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"gate": LENIENT_GATE}))
    settings = round_settings.model_copy(update={"retrain_config_file": config})

    result = run_round(settings, "manual")

    assert result.status == "succeeded", result.reason
    with psycopg.connect(round_db, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM retrain_runs WHERE id = %s", (result.run_id,)).fetchone()
        demos = conn.execute(
            """SELECT m.id, q.content FROM messages m JOIN messages q ON q.id = m.parent_id
               WHERE m.author_id IS NOT NULL"""
        ).fetchall()
    counts, sft = row["counts"], row["metrics"]["sft"]
    # The 50% split puts some demonstrations on each side; only the training side's are learnt.
    training = {str(d["id"]) for d in demos if not is_held_out([{"role": "user", "content": d["content"]}], 50)}
    assert 0 < len(training) < 10
    assert counts["sft_demonstrations"] == counts["demonstrations"] == len(training)
    assert counts["held_out_demonstrations"] == 10 - len(training)
    assert sft["ran"] and sft["used"] == len(training) and sft["steps"] > 0
    assert sft["loss_after"] < sft["loss_before"]
    assert row["timings"]["sft"] > 0 and row["timings"]["total"] > row["timings"]["sft"]
    # Each demonstration is also "edit beats original": the reward model reads them as pairs.
    assert counts["reward_pairs"] + counts["held_out_pairs"] == 20

    with registry.connect(round_db) as conn:
        candidate = registry.get(conn, result.candidate_id)
    manifest = checkpoint.verify(Path(candidate.path))
    assert set(manifest.config["data"]["demonstration_ids"]) == training  # never a held-out one
    assert manifest.config["sft"]["enabled"] is True
    # PPO ran after SFT, from it, and its KL is to the base (adapter off).
    assert row["metrics"]["ppo"]["last"]["kl"] >= 0


def test_a_round_learns_the_training_sides_liked_answers_before_ppo(round_db, round_settings, seed_store, tmp_path):
    """The seeded answers users liked, ended as the server records them (half cut at the token
    limit): the round's SFT learns the training side's ones, and the manifest names them."""
    seed_store(round_db, 10)
    with psycopg.connect(round_db, row_factory=dict_row) as conn:
        conn.execute("""UPDATE messages SET finish_reason = CASE WHEN content LIKE 'Please water it weekly%%'
                        THEN 'length' ELSE 'stop' END WHERE role = 'assistant'""")
        messages = {m["id"]: m for m in conn.execute("SELECT id, parent_id, role, content, finish_reason FROM messages")}
        liked = [messages[r["message_id"]] for r in conn.execute("SELECT message_id FROM ratings WHERE rating > 0")]

    def context(message) -> list[dict]:  # the turns the answer replies to, root first
        turns, at = [], messages[message["parent_id"]]
        while at:
            turns.insert(0, {"role": at["role"], "content": at["content"]})
            at = messages.get(at["parent_id"])
        return turns

    config = tmp_path / "config.json"
    config.write_text(json.dumps({"gate": LENIENT_GATE}))
    settings = round_settings.model_copy(update={"retrain_config_file": config})
    # Off by default: counted, not learnt.
    skipped = run_round(settings.model_copy(update={"retrain_ppo_iterations": 1}), "manual")
    with psycopg.connect(round_db, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM retrain_runs WHERE id = %s", (skipped.run_id,)).fetchone()
    assert row["counts"]["liked_answers"] > 0 and row["counts"]["sft_liked"] == 0
    assert row["metrics"]["sft"]["reason"] == (
        f"no demonstrations on the training side ({row['counts']['liked_answers']} liked answers: sft.liked_answers is off)")
    settings = settings.model_copy(update={"retrain_sft_liked_answers": True})

    result = run_round(settings, "manual")

    assert result.status == "succeeded", result.reason
    with psycopg.connect(round_db, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM retrain_runs WHERE id = %s", (result.run_id,)).fetchone()
    training = [m for m in liked if not is_held_out(context(m), 50)]
    assert 0 < len(training) < len(liked)
    counts, sft = row["counts"], row["metrics"]["sft"]
    assert counts["sft_liked"] == counts["liked_answers"] == len(training) and counts["sft_demonstrations"] == 0
    assert sft["ran"] and (sft["liked"], sft["demonstrations"], sft["used"]) == (len(training), 0, len(training))
    assert sft["cut"] == sum(r["finish_reason"] == "length" for r in training) > 0
    with registry.connect(round_db) as conn:
        candidate = registry.get(conn, result.candidate_id)
    manifest = checkpoint.verify(Path(candidate.path))
    assert set(manifest.config["data"]["liked_answer_ids"]) == {str(r["id"]) for r in training}
