"""bench/judge_probe.py: the loop users' votes on sampled conversations, and a reward model per
training size measured on the same held-out votes (on the tiny model; the real numbers come from
SmolLM2)."""

from __future__ import annotations

import json

from support.tiny_model import tiny_model_dir  # noqa: F401  (the session fixture)

from bench import judge_probe
from bench.preferences import PREFERENCES


def conversation(prompt: str, first: str, second: str) -> dict:
    return {"prompt": prompt, "answers": [{"text": first, "ended": True}, {"text": second, "ended": False}]}


def test_each_conversation_gives_a_comparison_and_a_thumb_per_answer():
    conversations = [
        conversation("p1", "one two three", "one"),  # the regenerate is shorter: better
        conversation("p2", "a b", "c d"),  # as many words: 'same'
        conversation("p3", "x", "x"),  # the same text twice: no comparison, two thumbs
        conversation("p4", "word " * 61, "word " * 70),  # both over 60 words: two thumbs down
    ]
    data = judge_probe.labelled(conversations, PREFERENCES["concise"], noise=0.0, seed=0)
    assert data.counts() == {"groups": 3, "pairs": 2, "ties": 1, "thumbs": 8}
    strict = data.groups[0].pairs[0]
    assert (strict.chosen, strict.rejected, strict.tie) == ("one", "one two three", False)
    assert data.groups[1].pairs[0].tie
    assert [thumb.label for thumb in data.thumbs] == [1] * 6 + [-1] * 2  # up at 60 words or fewer


def test_coin_toss_votes_disagree_with_the_preference_about_half_the_time():
    conversations = [conversation(f"p{i}", "one two three four", "one") for i in range(400)]
    data = judge_probe.labelled(conversations, PREFERENCES["concise"], noise=1.0, seed=1)
    agree = sum(group.pairs[0].chosen == "one" for group in data.groups) / len(data.groups)
    assert 0.4 < agree < 0.6


def test_every_size_is_measured_on_the_same_held_out_votes_and_answers_are_reused(tiny_model_dir, tmp_path, capsys):
    answers = tmp_path / "answers.json"
    common = ["--model", str(tiny_model_dir), "--held-out-conversations", "4", "--max-new-tokens", "6",
              "--batch-size", "4", "--threads", "1", "--answers", str(answers)]
    judge_probe.main([*common, "--preference", "concise", "--conversations", "6", "2", "--out", str(tmp_path / "concise.json")])
    sampled = answers.read_text()
    assert len(json.loads(sampled)["training"]) == 6 and len(json.loads(sampled)["held_out"]) == 4
    judge_probe.main([*common, "--preference", "simple", "--conversations", "3", "--out", str(tmp_path / "simple.json")])
    assert answers.read_text() == sampled  # the second preference judged the same answers

    report = json.loads((tmp_path / "concise.json").read_text())
    assert [run["conversations"] for run in report["runs"]] == [2, 6]
    assert report["runs"][0]["training"]["thumbs"] <= 4 < report["runs"][1]["training"]["thumbs"]
    for run in report["runs"]:
        assert run["held_out"]["thumbs"] == report["held_out"]["thumbs"] > 0
        assert 0.0 <= run["held_out"]["thumb_accuracy"] <= 1.0
    assert 0.0 <= report["held_out"]["thumbs_up_share"] <= 1.0
    assert json.loads((tmp_path / "simple.json").read_text())["preference"] == "simple"
    assert '"conversations": 6' in capsys.readouterr().out
