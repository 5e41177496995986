"""Rounds end to end on the tiny model and a real PostgreSQL: recorded, gated, registered."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import psycopg
import pytest
import torch
from psycopg.rows import dict_row

from deploy import checkpoint, registry
from deploy.base_model import resolve_base_model
from retrain import round as round_module
from retrain.round import STAGES, RoundFailed, round_seed, run_round
from retrain.settings import RetrainSettings

# A gate that anything passes (and one that nothing passes): the round's plumbing is under
# test here, not the tiny random model's answers.
LENIENT_GATE = {"min_win_rate": -1.0, "min_reward_gain": -1e9, "max_kl": 1e9, "max_empty_rate": 1.0,
                "max_truncated_rate_increase": 1.0, "max_repetitive_rate": 1.0,
                "min_reward_accuracy": 0.0, "reward_accuracy_confidence": 0.5, "min_reward_pairs": 0}
STRICT_GATE = {**LENIENT_GATE, "max_kl": -1.0}


def _with_gate(settings: RetrainSettings, tmp_path: Path, gate: dict, ppo: dict | None = None,
               **round_fields) -> RetrainSettings:
    path = tmp_path / f"config-{len(list(tmp_path.glob('config-*')))}.json"
    path.write_text(json.dumps({"gate": gate, "round": round_fields, "ppo": ppo or {}}))
    return settings.model_copy(update={"retrain_config_file": path})


def _run_row(url: str, run_id: int) -> dict:
    with psycopg.connect(url, row_factory=dict_row) as conn:
        return conn.execute("SELECT * FROM retrain_runs WHERE id = %s", (run_id,)).fetchone()


def _serving_base(url: str, settings: RetrainSettings) -> str:
    """What a server does at its first start: the base model serves."""
    with registry.connect(url) as conn:
        return registry.register_base(conn, resolve_base_model(settings.model, settings.data_dir), actor="test").id


def test_a_round_registers_and_promotes_a_passing_candidate_whose_manifest_tells_all(
    round_db, round_settings, seed_store, tmp_path
):
    seed_store(round_db, 10)
    base_id = _serving_base(round_db, round_settings)
    settings = _with_gate(round_settings, tmp_path, LENIENT_GATE)

    result = run_round(settings, "manual")

    assert (result.status, result.promoted) == ("succeeded", True), result.reason
    row = _run_row(round_db, result.run_id)
    assert (row["status"], row["candidate_id"], row["error"]) == ("succeeded", result.candidate_id, None)
    assert row["counts"]["reward_pairs"] + row["counts"]["held_out_pairs"] == 10
    assert row["counts"]["ppo_prompts"] > 0 and row["counts"]["gate_prompts_used"] > 0
    assert set(STAGES) <= set(row["timings"]) and row["timings"]["total"] > 0
    assert row["metrics"]["gate"]["win_rate"] is not None and row["metrics"]["decision"]["passed"]
    assert row["metrics"]["reward"]["warm_started_from"] is None  # the first round starts fresh
    assert len(row["metrics"]["ppo"]["iterations"]) == 1
    budget = row["metrics"]["ppo"]["kl_budget"]  # the shipped budget measured the one update
    assert (budget["max_kl"], budget["max_kl_step"]) == (16.0, 6.0) and budget["stopped_at"] is None
    assert math.isfinite(budget["final_kl"]) and budget["limit"] == pytest.approx(budget["start_kl"] + 6.0)

    with registry.connect(round_db) as conn:
        candidate = registry.get(conn, result.candidate_id)
        state = registry.read_state(conn)
    assert (candidate.status, candidate.kind, candidate.parent_id) == ("serving", "lora", base_id)
    assert candidate.metrics["run_id"] == result.run_id and "win_rate" in candidate.metrics
    # The judge's check counted the held-out thumbs beside the pairs (the seeded thumbs are on both sides).
    gate = row["metrics"]["gate"]
    assert gate["thumb_ranking"]["ups"] > 0 and gate["thumb_ranking"]["downs"] > 0
    assert candidate.metrics["judge_verdicts"] == gate["reward_pairs"] + gate["thumb_ranking"]["weight"]
    assert state.serving.id == result.candidate_id

    manifest = checkpoint.verify(Path(candidate.path))
    assert set(manifest.config) >= {"round", "reward", "ppo", "gate", "data", "serving"}
    assert manifest.config["ppo"]["num_iterations"] == 1
    assert manifest.config["round"]["run_id"] == result.run_id
    # The round's seed derives from the run's seed and id, and seeds PPO and the reward model.
    assert manifest.config["ppo"]["seed"] == manifest.config["reward"]["seed"] == round_seed(0, result.run_id)
    assert manifest.data_counts == {k: v for k, v in row["counts"].items() if isinstance(v, int)}
    assert manifest.metrics["gate"]["win_rate"] == row["metrics"]["gate"]["win_rate"]
    assert row["metrics"]["critic_from"] == "none"  # the default estimator (rloo) has no critic
    assert not (Path(candidate.path) / round_module.CRITIC_FILE).exists()
    gate_ids = set(manifest.config["data"]["gate_prompt_ids"])
    assert gate_ids and not gate_ids & set(manifest.config["data"]["ppo_prompt_ids"])

    # The next round builds on it: the serving adapter keeps training, the reward model warm-starts.
    second = run_round(settings, "schedule")
    assert second.status == "succeeded", second.reason
    with registry.connect(round_db) as conn:
        child = registry.get(conn, second.candidate_id)
    assert child.parent_id == result.candidate_id
    assert second.metrics["reward"]["warm_started_from"] == row["metrics"]["reward"]["path"]


def test_each_rounds_seed_derives_from_the_run_and_differs_between_rounds():
    # sha256("0:1") begins ef134f2a; its first 4 bytes with the top bit cleared: 0x6f134f2a.
    assert round_seed(0, 1) == 0x6F134F2A == 1863536426
    seeds = {round_seed(0, run) for run in range(1, 50)}
    assert len(seeds) == 49 and round_seed(1, 2) != round_seed(2, 1)
    assert round_seed(7, 3) == round_seed(7, 3)


def test_gaes_critic_is_kept_in_the_checkpoint_and_the_next_round_starts_from_it(
    round_db, round_settings, seed_store, tmp_path
):
    from safetensors.torch import load_file

    seed_store(round_db, 8)
    _serving_base(round_db, round_settings)
    settings = _with_gate(round_settings, tmp_path, LENIENT_GATE, ppo={"advantage_estimator": "gae"})
    first = run_round(settings, "manual")
    assert first.status == "succeeded", first.reason
    # The tiny reward model is as deep as the tiny policy: the critic starts as its head.
    assert first.metrics["critic_from"] == "reward model head"
    assert first.metrics["ppo"]["iterations"][0]["value_warmup_error_after"] is not None
    with registry.connect(round_db) as conn:
        path = Path(registry.get(conn, first.candidate_id).path)
    saved = load_file(path / round_module.CRITIC_FILE)
    assert saved["weight"].shape[0] == 1 and checkpoint.verify(path).files[round_module.CRITIC_FILE]

    second = run_round(settings, "schedule")
    assert second.metrics["critic_from"] == f"checkpoint {first.candidate_id}"


class LengthJudge:
    """A reward model stand-in for the pure ranking function: raw score = answer length."""

    def score(self, conversations, normalized=True):
        return torch.tensor([float(len(answer)) for _, answer in conversations])


def test_the_users_verdicts_on_the_serving_policys_answers_are_ranked_by_the_judge():
    from retrain.reward_data import ComparisonGroup, PreferencePair, RewardData, ThumbLabel

    prompt = [{"role": "user", "content": "q"}]
    mine = ("base", "base")
    held = RewardData(
        [ComparisonGroup(prompt, [
            PreferencePair("a longer answer", "short", versions=mine),  # judge agrees
            PreferencePair("tiny", "a longer one", versions=mine),  # judge disagrees
            PreferencePair("abc", "xyz", versions=mine),  # equal length: half
            PreferencePair("same", "sane", tie=True, versions=mine),  # a tie: not a ranking
            PreferencePair("a longer answer", "short", versions=("rl-1", "base")),  # not all serving's
        ])],
        [ThumbLabel(prompt, "ok", 1, version="base"), ThumbLabel(prompt, "fine", 1, version="other")],
    )
    report = round_module.users_on_serving_answers(LengthJudge(), held, "base")
    assert (report["version"], report["pairs"], report["accuracy"]) == ("base", 3, pytest.approx(1.5 / 3))
    assert (report["thumbs"], report["thumb_accuracy"]) == (1, 1.0)  # raw score 2 > 0 on a thumb up
    assert round_module.users_on_serving_answers(LengthJudge(), held, "nobody") is None
    # Every held-out thumb counts in the gate's ranking, whoever wrote it: "fine" (4) and "ok" (2)
    # up, "no" (2) and "bad" (3) down: fine > no, fine > bad, ok = no (half), ok < bad: 2.5 / 4.
    held.thumbs += [ThumbLabel(prompt, "no", -1, version="base"), ThumbLabel(prompt, "bad", -1, version="other")]
    assert round_module.held_out_thumb_ranking(LengthJudge(), held) == {"auc": 2.5 / 4, "ups": 2, "downs": 2, "weight": 2}
    assert round_module.held_out_thumb_ranking(LengthJudge(), RewardData([], [])) is None


def test_a_failing_gate_registers_a_rejection_with_its_reasons_and_serving_stays(
    round_db, round_settings, seed_store, tmp_path
):
    seed_store(round_db, 8)
    base_id = _serving_base(round_db, round_settings)
    result = run_round(_with_gate(round_settings, tmp_path, STRICT_GATE), "manual")

    assert (result.status, result.promoted) == ("rejected", False)
    assert "KL to the reference" in result.reason
    with registry.connect(round_db) as conn:
        rejected = registry.get(conn, result.candidate_id)
        assert registry.read_state(conn).serving.id == base_id
    assert rejected.status == "rejected" and rejected.reason.startswith("gate: KL to the reference")
    assert _run_row(round_db, result.run_id)["status"] == "rejected"


def test_a_round_whose_every_ppo_update_was_undone_registers_nothing(round_db, round_settings, seed_store, tmp_path):
    """A KL budget only the serving policy is within and no steps back: the one update is undone,
    so the candidate would be the serving policy. No gate, no checkpoint; the judge is kept."""
    seed_store(round_db, 8)
    base_id = _serving_base(round_db, round_settings)
    undone = {"max_kl": 1e-6, "max_kl_step": None, "kl_backtracks": 0, "learning_rate": 1.0}
    result = run_round(_with_gate(round_settings, tmp_path, LENIENT_GATE, ppo=undone), "manual")

    assert (result.status, result.candidate_id, result.promoted) == ("rejected", None, False)
    assert result.reason.startswith("PPO kept no update") and "gate" not in result.metrics
    assert result.metrics["ppo"]["kl_budget"]["kept_iteration"] == 0
    row = _run_row(round_db, result.run_id)
    assert (row["status"], row["candidate_id"]) == ("rejected", None)
    assert row["metrics"]["decision"]["summary"] == result.reason
    with psycopg.connect(round_db) as conn:
        assert conn.execute("SELECT id, status FROM checkpoints").fetchall() == [(base_id, "serving")]
    assert not list(round_settings.checkpoints_dir.glob("*"))
    assert list(round_settings.reward_dir.glob("run-*")), "the refreshed judge is the next round's warm start"


def test_a_pinned_registry_keeps_a_passing_candidate_a_candidate(round_db, round_settings, seed_store, tmp_path):
    seed_store(round_db, 8)
    base_id = _serving_base(round_db, round_settings)
    with registry.connect(round_db) as conn:
        registry.pin(conn, actor="operator", reason="holiday freeze")
    result = run_round(_with_gate(round_settings, tmp_path, LENIENT_GATE), "manual")

    assert (result.status, result.promoted) == ("succeeded", False)
    assert "pinned" in result.metrics["promotion"]["reason"]
    with registry.connect(round_db) as conn:
        assert registry.get(conn, result.candidate_id).status == "candidate"
        assert registry.read_state(conn).serving.id == base_id


def test_too_little_data_skips_the_round_and_touches_nothing(round_db, round_settings, seed_store):
    seed_store(round_db, 1)
    result = run_round(round_settings, "feedback")

    assert result.status == "skipped" and result.reason.startswith("too little data")
    row = _run_row(round_db, result.run_id)
    assert (row["status"], row["candidate_id"]) == ("skipped", None)
    assert row["metrics"]["skipped"] == result.reason and row["counts"]["prompts_read"] == 2
    with psycopg.connect(round_db) as conn:
        assert conn.execute("SELECT count(*) FROM checkpoints").fetchone()[0] == 0


def test_a_round_whose_ppo_crashes_is_failed_and_leaves_serving_untouched(
    round_db, round_settings, seed_store, monkeypatch
):
    seed_store(round_db, 8)
    base_id = _serving_base(round_db, round_settings)

    def crash(*args, **kwargs):
        raise RuntimeError("PPO blew up")

    monkeypatch.setattr(round_module, "train_ppo", crash)
    with pytest.raises(RoundFailed) as failure:
        run_round(round_settings, "manual")

    row = _run_row(round_db, failure.value.run_id)
    assert row["status"] == "failed" and "PPO blew up" in row["error"] and row["finished_at"]
    assert "reward_training" in row["timings"]  # the stages before the crash were recorded
    with psycopg.connect(round_db) as conn:
        statuses = conn.execute("SELECT id, status FROM checkpoints").fetchall()
    assert statuses == [(base_id, "serving")]
    # What the failed round wrote is gone: no reward model to warm-start from, no checkpoint.
    assert not list(round_settings.reward_dir.glob("run-*"))
    assert not list(round_settings.checkpoints_dir.glob("*"))


def test_once_on_too_little_data_exits_4_with_json(round_db, tiny_model_dir, tmp_path):
    env = {**os.environ, "DATABASE_URL": round_db, "MODEL": str(tiny_model_dir), "DATA_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "retrain", "once", "--json"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 4, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["status"] == "skipped" and result["exit_code"] == 4
    assert result["reason"].startswith("too little data")


def test_config_command_prints_the_full_config_and_the_file_overrides_it(tmp_path, monkeypatch, capsys):
    from retrain.__main__ import main

    overrides = tmp_path / "retrain.json"
    overrides.write_text(json.dumps({"ppo": {"kl_coef": 0.2}, "gate": {"max_kl": 3.0}}))
    monkeypatch.setenv("RETRAIN_CONFIG_FILE", str(overrides))
    monkeypatch.setenv("RETRAIN_PPO_ITERATIONS", "3")
    assert main(["config", "--json"]) == 0
    config = json.loads(capsys.readouterr().out)
    assert set(config) == {"round", "reward", "sft", "kto", "ppo", "gate"}
    assert (config["ppo"]["num_iterations"], config["ppo"]["kl_coef"], config["gate"]["max_kl"]) == (3, 0.2, 3.0)

    overrides.write_text(json.dumps({"ppo": {"kl_coeff": 0.2}}))
    with pytest.raises(ValueError, match="unknown ppo fields"):
        RetrainSettings().retrain_config()


def test_a_ppo_iteration_is_one_optimiser_step_unless_a_mini_batch_is_set(monkeypatch):
    ppo = RetrainSettings(retrain_config_file=None).retrain_config().ppo
    assert (ppo.batch_size, ppo.mini_batch_size, ppo.ppo_epochs) == (32, 32, 1)
    monkeypatch.setenv("RETRAIN_PPO_MINI_BATCH_SIZE", "8")
    assert RetrainSettings(retrain_config_file=None).retrain_config().ppo.mini_batch_size == 8
    monkeypatch.setenv("RETRAIN_PPO_MINI_BATCH_SIZE", "12")
    with pytest.raises(ValueError, match="BATCH_SIZE=32 must be a multiple of RETRAIN_PPO_MINI_BATCH_SIZE=12"):
        RetrainSettings()
