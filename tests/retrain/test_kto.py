"""KTO on the users' thumbs (retrain/kto.py): the loss by hand, and on the tiny model the liked
answers' log-ratio to the base rises and the disliked ones' falls, with the base as reference;
a round with kto.enabled learns the training side's thumbed answers before PPO."""

from __future__ import annotations

import json
import math
from datetime import datetime, timezone

import psycopg
import pytest
import torch
from psycopg.rows import dict_row
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.kto import KTOConfig, kto_loss, train_kto
from retrain.ppo import PPOConfig
from retrain.round import run_round
from retrain.sft import SFTExample

LENIENT_GATE = {"min_win_rate": -1.0, "min_reward_gain": -1e9, "max_kl": 1e9, "max_empty_rate": 1.0,
                "max_truncated_rate_increase": 1.0, "max_repetitive_rate": 1.0}


def test_the_kto_loss_by_hand():
    """Log-ratios 4 (liked) and 0 (disliked), beta 0.5: z = mean 2. Liked: 1 - sigmoid(0.5 (4 - 2))
    = 1 - sigmoid(1) = 0.268941; disliked: 1 - sigmoid(0.5 (2 - 0)) = 0.268941, weighed 0.5:
    mean (0.268941 + 0.134471) / 2 = 0.201706. A negative mean log-ratio puts z at 0."""
    loss, z = kto_loss(torch.tensor([4.0, 0.0]), torch.tensor([True, False]), 0.5, torch.tensor([1.0, 0.5]))
    assert z == 2.0 and loss.item() == pytest.approx(0.201706, abs=1e-6)
    _, z = kto_loss(torch.tensor([-4.0, 1.0]), torch.tensor([True, False]), 0.5, torch.ones(2))
    assert z == 0.0
    with pytest.raises(ValueError):
        KTOConfig(batch_size=1)


def example(question: str, answer: str, ended: bool = True) -> SFTExample:
    return SFTExample([{"role": "user", "content": question}], answer, ended, datetime.now(timezone.utc), "liked:x")


def test_liked_answers_rise_and_disliked_ones_fall_against_the_base(tiny_model_dir):
    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    labelled = [(example(f"How do I water plant {n}?", f"Gently, once a week, plant {n}."), True) for n in range(4)]
    labelled += [(example(f"How do I water plant {n}?", f"Flood it daily {n}", ended=False), False) for n in range(4)]
    result = train_kto(model, tokenizer, labelled, KTOConfig(epochs=6, learning_rate=3e-3), PPOConfig())
    stats = result.stats
    assert (stats["given"], stats["used"], stats["liked"], stats["cut"], stats["steps"]) == (8, 8, 4, 4, 12)
    assert stats["liked_log_ratio"] > 1.0 and stats["disliked_log_ratio"] < -1.0, stats
    assert stats["loss_last"] < stats["loss_first"]
    trainable = {name for name, p in result.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in name for name in trainable)  # the adapter PPO trains next
    # One kind of thumb only: nothing to tell apart, nothing learnt.
    alone = train_kto(AutoModelForCausalLM.from_pretrained(tiny_model_dir), tokenizer, labelled[:4], KTOConfig(), PPOConfig())
    assert alone.stats["steps"] == 0


def test_a_round_with_kto_learns_the_training_sides_thumbed_answers(round_db, round_settings, seed_store, tmp_path):
    seed_store(round_db, 10)
    with psycopg.connect(round_db) as conn:
        conn.execute("UPDATE messages SET finish_reason = 'stop' WHERE role = 'assistant'")
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"gate": LENIENT_GATE}))
    settings = round_settings.model_copy(update={"retrain_config_file": config, "retrain_kto": True})

    result = run_round(settings, "manual")

    assert result.status == "succeeded", result.reason
    with psycopg.connect(round_db, row_factory=dict_row) as conn:
        row = conn.execute("SELECT * FROM retrain_runs WHERE id = %s", (result.run_id,)).fetchone()
    counts, kto = row["counts"], row["metrics"]["kto"]
    assert counts["kto_answers"] == counts["liked_answers"] + counts["disliked_answers"] > 0
    assert counts["disliked_answers"] > 0
    assert kto["ran"] and kto["used"] == counts["kto_answers"] and math.isfinite(kto["liked_log_ratio"])
    assert row["timings"]["kto"] > 0
