"""bench/estimators.py on the tiny model: each estimator trains from the same base under the same
budget, and the report measures every run the same way (the real numbers come from SmolLM2)."""

from __future__ import annotations

import json
import math

import torch
from support.tiny_model import tiny_model_dir  # noqa: F401  (the session fixture)

from bench import estimators
from bench.preferences import PREFERENCES


def test_an_empty_answer_scores_below_the_batchs_worst():
    reward = estimators.preference_reward(PREFERENCES["concise"])
    torch.testing.assert_close(reward([[], [], []], ["a b c", "", "a"]), torch.tensor([-3.0, -4.0, -1.0]))


def test_each_estimator_is_measured_against_the_same_base(tiny_model_dir, tmp_path, capsys):
    out = tmp_path / "estimators.json"
    estimators.main(["--model", str(tiny_model_dir), "--preference", "concise", "--estimators", "rloo", "gae",
                     "--iterations", "1", "--batch-size", "4", "--max-new-tokens", "4", "--held-out", "4",
                     "--out", str(out)])
    report = json.loads(out.read_text())
    assert set(report["runs"]) == {"rloo", "gae"} and report["base"]["win_rate_vs_base"] == 0.5
    for run in report["runs"].values():
        assert 0 <= run["win_rate_vs_base"] <= 1 and math.isfinite(run["kl_to_base"])
        assert len(run["iterations"]) == 1
    assert "value_warmup_error_before" in report["runs"]["gae"]["iterations"][0]
    assert "rloo" in capsys.readouterr().out
