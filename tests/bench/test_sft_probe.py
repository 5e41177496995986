"""bench/sft_probe.py on the tiny model: one round's SFT on the users' edits, or on the answers
they liked among the policy's samples, measured on held-out prompts (the real numbers come from
SmolLM2)."""

from __future__ import annotations

import json
import math

from support.tiny_model import tiny_model_dir  # noqa: F401  (the session fixture)

from bench import sft_probe


def test_liked_answers_are_the_sampled_answers_the_users_thumb_up(tiny_model_dir, tmp_path):
    """Two sampled answers of 4 tokens to each of 3 prompts: under `concise` (thumbs up at 60
    words or fewer) every one is liked, and one that did not end is learnt as cut."""
    out = tmp_path / "liked.json"
    sft_probe.main(["--model", str(tiny_model_dir), "--preference", "concise", "--from", "liked",
                    "--demonstrations", "3", "--held-out", "2", "--max-new-tokens", "4", "--threads", "1",
                    "--out", str(out)])
    report = json.loads(out.read_text())
    assert (report["from"], report["answers_seen"], report["demonstrations"]) == ("liked", 6, 6)
    sft = report["sft"]
    assert (sft["liked"], sft["demonstrations"], sft["cut"]) == (6, 0, report["cut"])
    assert sft["used"] + sft["too_long"] == 6 and sft["steps"] > 0
    assert report["held_out_prompts"] == 2 and math.isfinite(report["sft_policy"]["kl_to_base"])
    assert 0 <= report["sft_policy"]["thumbs_up_rate"] <= 1


def test_edits_are_the_greedy_answers_rewritten_as_the_users_want(tiny_model_dir, tmp_path):
    out = tmp_path / "edits.json"
    sft_probe.main(["--model", str(tiny_model_dir), "--preference", "question", "--demonstrations", "2",
                    "--held-out", "2", "--max-new-tokens", "4", "--threads", "1", "--out", str(out)])
    report = json.loads(out.read_text())
    assert (report["from"], report["answers_seen"], report["cut"]) == ("edits", 2, 0)
    assert report["sft"]["liked"] == 0 and report["sft"]["demonstrations"] == report["demonstrations"] == 2


def test_kto_learns_every_sampled_answer_with_its_thumb_from_kept_samples(tiny_model_dir, tmp_path):
    """The samples are kept and read back, so SFT and KTO can learn from the same answers."""
    samples = tmp_path / "samples.json"
    samples.write_text(json.dumps([["p one", "short answer", True], ["p two", "word " * 70, False],
                                   ["p three", "fine", False]]))
    out = tmp_path / "kto.json"
    sft_probe.main(["--model", str(tiny_model_dir), "--preference", "concise", "--from", "liked", "--method", "kto",
                    "--samples", str(samples), "--held-out", "2", "--max-new-tokens", "4", "--threads", "1",
                    "--out", str(out)])
    report = json.loads(out.read_text())
    assert (report["method"], report["answers_seen"], report["demonstrations"], report["cut"]) == ("kto", 3, 2, 1)
    training = report["sft"]
    assert (training["given"], training["used"], training["liked"]) == (3, 3, 2) and training["steps"] > 0
    assert math.isfinite(training["loss_first"]) and math.isfinite(report["sft_policy"]["kl_to_base"])
