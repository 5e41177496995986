"""bench/loop.py end to end on the tiny model: the real server and `python -m retrain serve`
processes, the websocket protocol and PostgreSQL, one scheduled round, the swap, the report.

The tiny random model learns nothing worth measuring; this checks the loop runs by itself
(votes stored, a round started by the scheduler, the promoted candidate served and measured)
and that its report and plot are written. The real numbers come from SmolLM2 (README)."""

from __future__ import annotations

import json
from datetime import datetime

import pytest

from support.tiny_model import tiny_model_dir  # noqa: F401  (the session fixture)

from bench import loop


async def test_one_round_of_the_loop_on_the_tiny_model(tiny_model_dir, admin_url, tmp_path):
    args = loop.parse_args([
        "--quick", "--preference", "concise", "--noise", "0.2", "--rounds", "1", "--conversations", "12",
        "--held-out", "6", "--max-new-tokens", "8", "--users", "3", "--threads", "1",
        "--model", str(tiny_model_dir), "--database-url", admin_url, "--out", str(tmp_path / "out"),
        "--start-timeout-s", "120", "--round-timeout-s", "300",
        "--round-config", '{"ppo": {"no_eos_penalty_mode": "replace"}}',
    ])
    report = await loop.run(args)

    assert [r.round for r in report.rounds] == [0, 1]
    base, after = report.rounds
    assert base.model_version == "TinySmolLM2" and base.win_rate_vs_round_0 == 0.5 and base.kl_to_base == 0
    run = after.run
    assert run["trigger"] == "feedback"  # the scheduler started it, on the day's votes
    assert run["status"] in ("succeeded", "rejected") and run["decision"].startswith("gate")
    assert 0 <= run["gate_repetitive_rate"] <= 1  # the candidate's, from the round's gate
    assert run["day_votes"]["conversations"] == 12
    assert run["day_votes"]["thumbs_up"] + run["day_votes"]["thumbs_down"] == 24
    compared = sum(run["day_votes"][v] for v in ("better", "worse", "same"))
    assert compared == 12 and 0 <= run["day_votes"]["compared_both_cut"] <= compared
    if run["promoted"]:
        assert after.model_version == run["candidate"] and after.kl_to_base >= 0
    else:
        assert after.model_version == "TinySmolLM2"
        # The same policy, measured one prompt at a time: the same greedy answers as round 0's.
        assert after.win_rate_vs_round_0 == 0.5 and after.examples == base.examples
    assert 0 <= after.win_rate_vs_round_0 <= 1 and 0 <= after.thumbs_up_rate <= 1
    assert len(after.examples) == 4 and after.mean_tokens <= 8

    written = json.loads((tmp_path / "out" / "loop.json").read_text())
    assert written["preference"] == "concise" and len(written["rounds"]) == 2
    assert (tmp_path / "out" / "loop.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report.stopped_because == "1 rounds done"
    ppo = report.settings["round_config"]["ppo"]  # the profile's config with --round-config over it
    assert ppo["no_eos_penalty_mode"] == "replace" and ppo["advantage_estimator"] == "rloo"
    assert report.measured_under == "concise" and after.users_thumbs_up_rate == after.thumbs_up_rate


def test_the_full_profile_is_the_shipped_defaults(tiny_model_dir):
    """One configuration: every reported result uses what `python -m retrain config` prints."""
    from retrain.settings import RetrainSettings

    assert loop.PROFILES["full"]["retrain"] == {} and loop.PROFILES["full"]["config"] == {}
    shipped = RetrainSettings(model=str(tiny_model_dir)).retrain_config(tiny_model_dir).to_json()
    looped = loop.effective_round_config({}, tiny_model_dir)
    assert looped["ppo"] == shipped["ppo"] and looped["gate"] == shipped["gate"] and looped["reward"] == shipped["reward"]


def test_controls_run_beside_the_result_in_the_same_configuration(tmp_path):
    args = loop.parse_args(["--preference", "concise", "--noise", "0.3", "--controls", "--out", str(tmp_path)])
    runs = loop.control_runs(args)
    assert [label for label, _ in runs] == [
        "result", "control: random votes (noise 1.0)", "control: verbose users, measured under concise"]
    (_, result), (_, random_votes), (_, verbose) = runs
    assert (result.preference, result.noise, result.measure_preference) == ("concise", 0.3, None)
    assert (random_votes.preference, random_votes.noise) == ("concise", 1.0)
    assert (verbose.preference, verbose.noise, verbose.measure_preference) == ("verbose", 0.3, "concise")
    same = {"profile", "rounds", "conversations", "round_config", "threads", "seed", "users"}
    assert all({k: getattr(v, k) for k in same} == {k: getattr(result, k) for k in same} for _, v in runs)
    assert not any(v.controls for _, v in runs)
    simple = loop.control_runs(loop.parse_args(["--preference", "simple", "--controls"]))
    assert [label for label, _ in simple] == ["result", "control: random votes (noise 1.0)"]


def _report(preference, noise, wins, measured_under="concise", settings=None):
    rows = [loop.RoundRow(round=i, model_version="v", minutes=float(i), score=None, empty_answers=0,
                          thumbs_up_rate=w / 2, win_rate_vs_round_0=w, users_thumbs_up_rate=w / 2, kl_to_base=0.0,
                          mean_words=50.0, mean_tokens=60.0, eos_rate=0.5) for i, w in enumerate(wins)]
    return loop.Report(when="now", preference=preference, description="", noise=noise, edits=0.0,
                       measured_under=measured_under, profile="full", settings=settings or {}, machine={},
                       kl_bound=8.0, prompts={"held_out": 40}, rounds=rows)


def test_the_controls_report_puts_the_runs_side_by_side(tmp_path):
    controls = loop.ControlsReport(["result", "control"], [_report("concise", 0.0, [0.5, 0.8]),
                                                           _report("concise", 1.0, [0.5, 0.5])])
    controls.write(tmp_path)
    written = json.loads((tmp_path / "controls.json").read_text())
    assert [(r["label"], r["noise"], [x["win_rate_vs_round_0"] for x in r["rounds"]]) for r in written] == [
        ("result", 0.0, [0.5, 0.8]), ("control", 1.0, [0.5, 0.5])]
    assert (tmp_path / "controls.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_controls_table_shows_each_rounds_gate_beside_what_was_measured(tmp_path):
    result, control = _report("simple", 0.0, [0.5, 0.8, 0.75]), _report("simple", 1.0, [0.5, 0.5, 0.5])
    result.rounds[1].run = {"status": "succeeded", "promoted": True, "gate_win_rate": 0.8125,
                            "gate_win_rate_lower": 0.6, "reward_accuracy": 0.7, "reward_pairs": 30,
                            "users_on_serving_answers": {"thumb_accuracy": 0.75, "thumbs": 60}, "gate_kl": 2.5,
                            "ppo_kl_budget": {"max_kl": 16.0, "limit": 10.4, "stopped_at": None,
                                              "backtracks": [{"iteration": 2, "kl": 12.24, "learning_rate": 2.5e-4}]}}
    result.rounds[2].run = {"status": "skipped", "promoted": False}
    control.rounds[2].run = {"status": "rejected", "promoted": False, "gate_win_rate": 0.5,
                             "gate_win_rate_lower": 0.3, "reward_accuracy": None, "gate_kl": 6.5,
                             "ppo_kl_budget": {"max_kl": 6.0, "limit": 6.3, "stopped_at": 2, "stop_kl": 6.5,
                                               "kept_iteration": 1}}
    control.rounds[1].run = {"status": "rejected", "promoted": False, "gate_win_rate": 0.25,
                             "gate_win_rate_lower": 0.1, "reward_accuracy": None, "gate_kl": 1.0,
                             "gate_repetitive_rate": 0.15,
                             "ppo_kl_budget": {"max_kl": 6.0, "stopped_at": 5, "stop_kl": 7.38, "kept_iteration": 4}}
    loop.ControlsReport(["result", "control"], [result, control]).write(tmp_path)
    lines = (tmp_path / "controls.md").read_text().splitlines()
    assert lines[2:] == [
        "| round | result | control |",
        "|---|---|---|",
        "| 0 | 0.50 / 0.25 | 0.50 / 0.25 |",
        "| 1 | 0.80 / 0.40; succeeded, promoted 0.81 (0.60), judge 0.70 on 30, thumbs 0.75 on 60, KL 2.50, "
        "PPO stepped back 1x (KL 12.2 > 10.4) "
        "| 0.50 / 0.25; rejected 0.25 (0.10), KL 1.00, 15% repetitive, PPO stopped at its KL budget (7.4 > 6.0), "
        "kept iteration 4 |",
        "| 2 | 0.75 / 0.38; skipped | 0.50 / 0.25; rejected 0.50 (0.30), KL 6.50, PPO stopped at its KL budget "
        "(6.5 > 6.3), kept iteration 1 |",
    ]
    # A round whose PPO kept no update had no candidate and no gate.
    result.rounds[2].run = {"status": "rejected", "promoted": False}
    assert "| 2 | 0.75 / 0.38; rejected, no candidate: PPO kept no update |" in loop.markdown_controls(
        loop.ControlsReport(["result", "control"], [result, control]))
    # The judge's ranking of the held-out thumbs replaces the sign rule, with the check on both.
    result.rounds[1].run |= {"thumb_ranking": {"auc": 0.85, "ups": 12, "downs": 14, "weight": 12},
                             "judge_accuracy": 0.648, "judge_accuracy_lower": 0.52, "judge_verdicts": 42}
    assert ("judge 0.70 on 30, thumbs ranked 0.85 (12 up, 14 down), judged on both 0.65 on 42 (0.52), KL 2.50"
            in loop.markdown_controls(loop.ControlsReport(["result", "control"], [result, control])))
    # A round whose SFT ran says on what, and how far its loss fell.
    result.rounds[1].run["sft"] = {"ran": True, "demonstrations": 0, "liked": 56, "used": 56,
                                   "loss_before": 1.234, "loss_after": 0.9}
    assert "SFT on 56 liked (loss 1.23 -> 0.90) |" in loop.markdown_controls(
        loop.ControlsReport(["result", "control"], [result, control]))
    result.rounds[1].run["kto"] = {"ran": True, "used": 150, "liked": 50, "liked_log_ratio": 12.34,
                                   "disliked_log_ratio": -20.0}
    assert "SFT on 56 liked (loss 1.23 -> 0.90), KTO on 150 (50 liked; log-ratio +12.3 liked, -20.0 disliked) |" in (
        loop.markdown_controls(loop.ControlsReport(["result", "control"], [result, control])))
    # A KL that was not a number is stored as null: the table says so rather than fail.
    control.rounds[2].run["ppo_kl_budget"]["stop_kl"] = None
    assert "PPO stopped on a KL that was not a number, kept iteration 1" in loop.markdown_controls(
        loop.ControlsReport(["result", "control"], [result, control]))


def test_runs_made_apart_go_side_by_side_only_in_the_same_configuration(tmp_path):
    config = {"round_config": {"ppo": {"advantage_estimator": "rloo"}}, "conversations": 24}
    _report("concise", 0.0, [0.5, 0.8], settings=config).write(tmp_path / "result")
    _report("concise", 1.0, [0.5, 0.55], settings=config).write(tmp_path / "noise100")
    _report("verbose", 0.0, [0.5, 0.3], settings=config).write(tmp_path / "verbose")

    loop.main(["--side-by-side", str(tmp_path / "result"), str(tmp_path / "noise100"), str(tmp_path / "verbose"),
               "--out", str(tmp_path / "side")])
    written = json.loads((tmp_path / "side" / "controls.json").read_text())
    assert [(r["label"], [x["win_rate_vs_round_0"] for x in r["rounds"]]) for r in written] == [
        ("result", [0.5, 0.8]), ("control: random votes (noise 1.0)", [0.5, 0.55]),
        ("control: verbose users, measured under concise", [0.5, 0.3])]

    other = {**config, "round_config": {"ppo": {"advantage_estimator": "gae"}}}
    _report("concise", 1.0, [0.5, 0.9], settings=other).write(tmp_path / "gae")
    with pytest.raises(ValueError, match="round_config"):
        loop.side_by_side(tmp_path / "result", [tmp_path / "gae"], tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


async def test_a_bad_round_config_is_refused_before_anything_starts(tiny_model_dir, tmp_path):
    args = loop.parse_args(["--quick", "--round-config", '{"ppo": {"kl_coeff": 0.1}}', "--out", str(tmp_path),
                            "--model", str(tiny_model_dir)])
    with pytest.raises(ValueError, match="kl_coeff"):
        await loop.run(args)
    assert not (tmp_path / "loop.json").exists()


async def test_users_who_edit_answers_feed_the_rounds_sft(tiny_model_dir, admin_url, tmp_path):
    # Every conversation edited: the tiny model never ends an answer with a question, so the
    # users' comparisons are all ties and the edits are the round's only preference pairs; a
    # smaller share could leave the training side under the quick profile's 4 pairs, and the
    # round would be skipped before SFT (the share itself: tests/bench/test_preferences.py).
    args = loop.parse_args([
        "--quick", "--preference", "question", "--edits", "1.0", "--rounds", "1", "--conversations", "12",
        "--held-out", "6", "--max-new-tokens", "8", "--users", "3", "--threads", "1",
        "--model", str(tiny_model_dir), "--database-url", admin_url, "--out", str(tmp_path / "out"),
        "--start-timeout-s", "120", "--round-timeout-s", "300",
    ])
    report = await loop.run(args)

    run = report.rounds[1].run
    assert run["status"] in ("succeeded", "rejected"), run  # the round ran through SFT and PPO
    votes = run["day_votes"]
    assert votes["edits"] == 12
    assert votes["thumbs_up"] + votes["thumbs_down"] == 24  # and they voted as before
    counts = run["counts"]
    # Every edit is a demonstration on one side of the split (the loop asks distinct prompts),
    # and the round fine-tunes on the training side's only.
    assert counts["demonstrations"] + counts["held_out_demonstrations"] == 12
    assert counts["sft_demonstrations"] == counts["demonstrations"] > 0
    assert run["sft"]["ran"] and run["sft"]["loss_after"] < run["sft"]["loss_before"]
    assert run["timings_s"]["sft"] > 0
    assert report.edits == 1.0 and json.loads((tmp_path / "out" / "loop.json").read_text())["edits"] == 1.0


async def test_parallel_controls_run_at_once_and_land_side_by_side(tiny_model_dir, admin_url, tmp_path):
    args = loop.parse_args([
        "--quick", "--preference", "simple", "--controls", "--parallel", "--rounds", "1", "--conversations", "8",
        "--held-out", "4", "--max-new-tokens", "8", "--users", "2", "--threads", "1",
        "--model", str(tiny_model_dir), "--database-url", admin_url, "--out", str(tmp_path),
        "--start-timeout-s", "120", "--round-timeout-s", "300",
    ])
    controls = await loop.run_with_controls(args)

    assert controls.labels == ["result", "control: random votes (noise 1.0)"]
    assert [r.noise for r in controls.runs] == [0.0, 1.0]
    # At once: the control started before the result had finished (in a row, it starts after).
    result, control = controls.runs
    started = [datetime.fromisoformat(r.when) for r in (result, control)]
    assert abs((started[1] - started[0]).total_seconds()) < result.minutes * 60
    written = json.loads((tmp_path / "controls.json").read_text())
    assert [w["label"] for w in written] == controls.labels
    assert all(len(w["rounds"]) == 2 for w in written)  # round 0 and the day's round, each run
    for sub in ("result", "noise100"):
        assert json.loads((tmp_path / sub / "loop.json").read_text())["rounds"]


def test_parallel_needs_controls():
    with pytest.raises(SystemExit):
        loop.parse_args(["--parallel"])


def test_the_runs_seed_seeds_its_rounds_too():
    profile = loop.PROFILES["full"]
    assert loop.round_config_overrides(profile, loop.parse_args(["--seed", "3"]))["round"]["seed"] == 3
    assert loop.round_config_overrides(profile, loop.parse_args([]))["round"]["seed"] == 0
    overridden = loop.round_config_overrides(profile, loop.parse_args(
        ["--seed", "3", "--round-config", '{"round": {"seed": 7}, "ppo": {"num_iterations": 2}}']))
    assert (overridden["round"]["seed"], overridden["ppo"]) == (7, {"num_iterations": 2})


def test_edits_must_be_a_share():
    with pytest.raises(SystemExit):
        loop.parse_args(["--edits", "1.5"])
