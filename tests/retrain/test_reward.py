"""The reward model on a tiny randomly initialised Llama with SmolLM2's real tokenizer
(`tiny_model_dir`, from tests/support/tiny_model.py via tests/retrain/conftest.py)."""

from __future__ import annotations

import json
import random

import pytest
import torch

from retrain.reward import (
    RewardConfig,
    accuracy_report,
    last_token_index,
    load_reward_model,
    new_reward_model,
    preference_loss,
    read_preference_jsonl,
    save_reward_model,
    train_reward_model,
)
from retrain.reward_data import (
    ComparisonGroup,
    EncodedGroup,
    EncodedThumb,
    PreferencePair,
    RewardData,
    ThumbLabel,
    collate,
    encode_answer,
    encode_conversation,
    split_held_out,
)

WORDS = "river stone cloud maple lantern copper meadow violet harbor pepper quiet window silver garden".split()
TOPICS = ["cooking", "the weather", "travel", "music", "a good book", "gardening", "the sea", "mountains"]


def planted_rule_data(n_groups: int, seed: int) -> RewardData:
    """Humans (planted) prefer the answer that mentions 'banana'; lengths are matched so the
    shorter-wins shortcut is useless."""
    rng = random.Random(seed)
    groups = []
    for i in range(n_groups):
        prompt = [{"role": "user", "content": f"Tell me something about {rng.choice(TOPICS)} ({i})."}]
        words = rng.sample(WORDS, 6)
        plain = " ".join(words)
        with_word = " ".join(words[:3] + ["banana"] + words[4:])
        groups.append(ComparisonGroup(prompt, [PreferencePair(with_word, plain, f"g{i}")]))
    return RewardData(groups)


def tiny_config(tiny_model_dir, **overrides) -> RewardConfig:
    settings = dict(base_model=str(tiny_model_dir), max_tokens=64, batch_size=16, eval_batch_size=32, epochs=1,
                    learning_rate=3e-3, head_learning_rate=3e-3, warmup_fraction=0.0, normalization_samples=32, log_every=1000)
    return RewardConfig(**{**settings, **overrides})


def test_learns_a_planted_rule(tiny_model_dir, tmp_path):
    train = planted_rule_data(128, seed=1)
    held_out = planted_rule_data(100, seed=2)
    config = tiny_config(tiny_model_dir, lora_rank=0, epochs=2)

    metrics = train_reward_model(train, config, tmp_path / "rm", eval_data=held_out)

    assert metrics["eval_accuracy"] >= 0.9, metrics["epochs"]
    assert metrics["eval"]["pairs"] == 100
    assert metrics["pairs_per_second"] > 0
    model = load_reward_model(tmp_path / "rm")
    group = held_out.groups[0]
    chosen, rejected = model.score([(group.prompt, p) for p in (group.pairs[0].chosen, group.pairs[0].rejected)])
    assert chosen > rejected


@pytest.mark.parametrize("pooling", ["mean", "last"])
def test_a_score_does_not_depend_on_the_padding_of_its_batch(tiny_model_dir, pooling):
    model = new_reward_model(tiny_config(tiny_model_dir, lora_rank=0, pooling=pooling))
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.weight, std=0.5)  # a zero head would score everything 0
    short = ([{"role": "user", "content": "Hi"}], "Hello!")
    long = ([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}],
            "Once upon a time a keeper kept a light on a rock in the sea, night after night, for years.")
    ids = encode_conversation(model.tokenizer, *short, max_tokens=64)
    # The case that breaks pad-id pooling: SmolLM2 pads with its end-of-turn token, which is
    # also the real last token of every scored sequence.
    assert ids[-1] == model.tokenizer.pad_token_id == model.tokenizer.eos_token_id

    alone = model.score([short], normalized=False)
    in_batch = model.score([short, long], batch_size=2, normalized=False)

    torch.testing.assert_close(in_batch[0], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.isclose(in_batch[0], in_batch[1])


def test_the_answers_own_tokens_are_its_text_and_end_of_turn(tiny_model_dir):
    tokenizer = new_reward_model(tiny_config(tiny_model_dir)).tokenizer
    prompt = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is rain?"}]
    answer = "Water falling from clouds."

    ids, answer_tokens = encode_answer(tokenizer, prompt, answer, max_tokens=256)

    assert tokenizer.decode(ids[-answer_tokens:]) == answer + "<|im_end|>"
    assert len(ids) > answer_tokens  # the prompt's tokens are there, before the answer's
    # Cut to fewer tokens than the answer has: every token kept is the answer's.
    cut, cut_answer_tokens = encode_answer(tokenizer, prompt, answer, max_tokens=3)
    assert (len(cut), cut_answer_tokens) == (3, 3)


def test_mean_pooling_averages_the_answers_tokens_only(tiny_model_dir):
    model = new_reward_model(tiny_config(tiny_model_dir, lora_rank=0, pooling="mean")).eval()
    torch.manual_seed(0)
    torch.nn.init.normal_(model.head.weight, std=0.5)
    prompt = [{"role": "user", "content": "Name a colour."}]
    ids, answer_tokens = encode_answer(model.tokenizer, prompt, "Blue, like the sky.", max_tokens=64)

    score = model.score([(prompt, "Blue, like the sky.")], normalized=False)[0]

    with torch.no_grad():
        hidden = model.body(input_ids=torch.tensor([ids])).last_hidden_state[0]
        by_hand = model.head(hidden[-answer_tokens:].mean(dim=0))[0]
        whole = model.head(hidden.mean(dim=0))[0]
    torch.testing.assert_close(score, by_hand, atol=1e-5, rtol=1e-5)
    assert not torch.isclose(score, whole)  # the prompt's tokens are not in the average


def test_the_answer_mask_marks_each_rows_last_answer_tokens():
    group = EncodedGroup(sequences=[[1, 2, 3, 4], [5, 6]], pairs=[(0, 1)], answer_tokens=[2, 1])
    batch = collate([group, EncodedThumb([7, 8, 9], 1, None)], pad_id=0)
    assert batch["answer_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0], [1, 1, 1, 0]]  # None: all of it


def test_pooling_is_checked_and_a_model_saved_before_it_existed_reads_the_last_token(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="pooling must be one of mean, last"):
        tiny_config(tiny_model_dir, pooling="max")
    path = save_reward_model(new_reward_model(tiny_config(tiny_model_dir, pooling="last")), tmp_path / "old")
    manifest = json.loads((path / "reward_model.json").read_text())
    del manifest["config"]["pooling"]
    (path / "reward_model.json").write_text(json.dumps(manifest))

    assert load_reward_model(path).config.pooling == "last"


@pytest.mark.parametrize("lora_rank", [0, 4])
def test_only_the_top_blocks_and_the_head_learn(tiny_model_dir, lora_rank):
    model = new_reward_model(tiny_config(tiny_model_dir, lora_rank=lora_rank, trainable_layers=1))
    learning = [name for name, p in model.named_parameters() if p.requires_grad]
    assert "head.weight" in learning
    assert any("layers.1." in name for name in learning)
    assert not any("layers.0." in name or "embed_tokens" in name for name in learning)
    if lora_rank:
        assert all("lora_" in name for name in learning if name.startswith("body."))


def test_last_token_index_from_the_mask_with_either_padding():
    right = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    left = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 1]])
    assert last_token_index(right).tolist() == [2, 4]
    assert last_token_index(left).tolist() == [4, 4]


def test_each_group_counts_once_however_many_pairs_it_has():
    ranked = ComparisonGroup.from_ranking([{"role": "user", "content": "q"}], ["a", "b", "c", "d"])
    assert len(ranked.pairs) == 6  # C(4, 2)
    big = EncodedGroup(sequences=[[1], [2], [3], [4]], pairs=[(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)])
    single = EncodedGroup(sequences=[[5], [6]], pairs=[(0, 1)])
    thumb = EncodedThumb(sequence=[7], label=-1)
    batch = collate([big, single, thumb], pad_id=0)
    assert batch["pair_weight"].tolist() == pytest.approx([1 / 6] * 6 + [1.0])

    scores = torch.tensor([2.0, 1.0, 0.5, -1.0, 0.3, 0.1, 0.7])
    loss, stats = preference_loss(scores, batch, thumb_weight=0.5, center_coef=0.0)

    nll = lambda margin: -torch.nn.functional.logsigmoid(torch.as_tensor(margin))  # noqa: E731
    big_mean = sum(nll(scores[c] - scores[r]) for c, r in big.pairs) / 6
    expected = (big_mean + nll(0.3 - 0.1) + 0.5 * nll(-0.7)) / 3  # three items, each once
    torch.testing.assert_close(loss, expected)
    assert stats["pairs"] == 7 and stats["thumbs"] == 1

    # Repeating a group's pairs changes nothing: the group's weight is fixed.
    doubled = EncodedGroup(sequences=big.sequences, pairs=big.pairs * 2)
    loss_doubled, _ = preference_loss(scores, collate([doubled, single, thumb], pad_id=0), 0.5, 0.0)
    torch.testing.assert_close(loss_doubled, expected)

    centred, _ = preference_loss(scores, batch, thumb_weight=0.5, center_coef=0.1)
    torch.testing.assert_close(centred, expected + 0.1 * scores.mean() ** 2)


def test_a_same_verdict_is_a_tie_term_least_at_equal_scores():
    """A tie is Bradley-Terry with target 1/2: -(log s(d) + log s(-d)) / 2, d = r_a - r_b.
    By hand: d = 0 gives ln 2 = 0.693147; d = 2 gives (ln(1 + e^-2) + ln(1 + e^2)) / 2
    = (0.126928 + 2.126928) / 2 = 1.126928. It shares its group's weight with the strict pair."""
    group = EncodedGroup(sequences=[[1], [2], [3]], pairs=[(0, 1)], ties=[(1, 2)])
    batch = collate([group], pad_id=0)
    assert batch["pair_weight"].tolist() == [0.5] and batch["tie_weight"].tolist() == [0.5]
    assert (batch["tie_a"].tolist(), batch["tie_b"].tolist()) == ([1], [2])

    equal = torch.tensor([1.0, 0.0, 0.0])  # pair margin 1, tie margin 0
    loss, stats = preference_loss(equal, batch, thumb_weight=0.5, center_coef=0.0, tie_weight=1.0)
    pair_term = -torch.nn.functional.logsigmoid(torch.tensor(1.0))  # ln(1 + e^-1) = 0.313262
    torch.testing.assert_close(loss, 0.5 * pair_term + 0.5 * torch.tensor(0.693147), atol=1e-6, rtol=0)
    assert (stats["pairs"], stats["ties"]) == (1, 1)

    apart = torch.tensor([1.0, 2.0, 0.0])  # pair margin -1, tie margin 2
    loss, _ = preference_loss(apart, batch, 0.5, 0.0, tie_weight=1.0)
    torch.testing.assert_close(loss, torch.tensor(0.5 * 1.313262 + 0.5 * 1.126928), atol=1e-6, rtol=0)
    without, _ = preference_loss(apart, batch, 0.5, 0.0, tie_weight=0.0)  # ties left out
    torch.testing.assert_close(without, torch.tensor(0.5 * 1.313262), atol=1e-6, rtol=0)


def test_a_tie_in_a_group_is_counted_apart_from_the_strict_pairs():
    prompt = [{"role": "user", "content": "q"}]
    data = RewardData([ComparisonGroup(prompt, [PreferencePair("a", "b"), PreferencePair("b", "c", tie=True)])])
    assert data.counts() == {"groups": 1, "pairs": 1, "ties": 1, "thumbs": 0}


def test_held_out_accuracy_comes_with_its_pair_count_and_a_wilson_interval():
    """Wilson 95% for 8 of 10 by hand: z = 1.959964, centre (0.8 + z^2/20) / (1 + z^2/10)
    = 0.992073 / 1.384146 = 0.716740, half-width z sqrt(0.016 + z^2/400) / 1.384146 = 0.226578:
    [0.490162, 0.943318] (so 8 of 10 does not yet show the judge beats a coin)."""
    report = accuracy_report(8, 10, thumbs_correct=3, thumbs=4)
    assert (report["accuracy"], report["pairs"], report["thumbs"]) == (0.8, 10, 4)
    assert report["accuracy_interval"] == pytest.approx([0.490162, 0.943318], abs=1e-5)
    assert report["thumb_accuracy"] == 0.75 and report["thumb_accuracy_interval"][0] < 0.75
    assert accuracy_report(0, 0)["accuracy_interval"] is None


def test_warm_start_resumes_from_the_previous_model(tiny_model_dir, tmp_path):
    train, held_out = planted_rule_data(96, seed=3), planted_rule_data(48, seed=4)
    first = train_reward_model(train, tiny_config(tiny_model_dir, lora_rank=8), tmp_path / "first", eval_data=held_out)
    before = load_reward_model(tmp_path / "first").score([(g.prompt, g.pairs[0].chosen) for g in held_out.groups])

    # A refresh with a different rank and pooling asked for still gets the previous model's
    # shape, and starts exactly where the previous model ended.
    refresh = tiny_config(tiny_model_dir, lora_rank=2, pooling="last", epochs=0, eval_at_start=True)
    second = train_reward_model(train, refresh, tmp_path / "second", eval_data=held_out, init_from=tmp_path / "first")

    assert second["warm_started_from"] == str(tmp_path / "first")
    assert second["eval_before"]["accuracy"] == first["eval_accuracy"]
    assert second["eval_before"]["mean_margin"] == pytest.approx(first["eval"]["mean_margin"], abs=1e-5)
    resumed = load_reward_model(tmp_path / "second")
    assert (resumed.config.lora_rank, resumed.config.pooling) == (8, "mean")
    after = resumed.score([(g.prompt, g.pairs[0].chosen) for g in held_out.groups], normalized=False)
    torch.testing.assert_close(after, before * resumed.scale + resumed.bias, atol=1e-4, rtol=1e-4)


def test_normalisation_centres_the_reference_answers(tiny_model_dir, tmp_path):
    data = planted_rule_data(64, seed=5)
    reference = [(g.prompt, g.pairs[0].rejected) for g in planted_rule_data(20, seed=6).groups]
    metrics = train_reward_model(data, tiny_config(tiny_model_dir, lora_rank=0), tmp_path / "rm",
                                 eval_data=planted_rule_data(16, seed=7), reference=reference)

    model = load_reward_model(tmp_path / "rm")
    scores = model.score(reference)

    assert metrics["normalization"]["samples"] == 20
    assert abs(float(scores.mean())) < 1e-4
    assert float(scores.std()) == pytest.approx(1.0, abs=1e-3)
    raw = model.score(reference, normalized=False)
    assert float(raw.std()) != pytest.approx(1.0, abs=1e-3)  # the scale really did something


def test_thumbs_alone_train_and_are_evaluated(tiny_model_dir, tmp_path):
    rng = random.Random(8)
    def thumbs(n):
        out = []
        for i in range(n):
            words = rng.sample(WORDS, 5)
            good = rng.random() < 0.5
            answer = " ".join(words + (["banana"] if good else ["turnip"]))
            out.append(ThumbLabel([{"role": "user", "content": f"say something {i}"}], answer, 1 if good else -1))
        return out
    # A pointwise label is a weaker signal than a contrast: on the random tiny model the loss
    # sits at ln 2 for several epochs at the pair tests' learning rate, so this one trains
    # harder (measured: held-out thumb accuracy 0.53 at lr 3e-3 x 5 epochs, 0.93 at 1e-2). The
    # label's word is the answer's last, next to the end-of-turn token that 'last' pooling reads;
    # averaged over the random model's answer tokens it is a faint signal (0.58 here with 'mean').
    config = tiny_config(tiny_model_dir, lora_rank=0, epochs=6, thumb_weight=1.0, learning_rate=1e-2,
                         head_learning_rate=1e-2, center_coef=0.0, pooling="last")
    metrics = train_reward_model(RewardData(thumbs=thumbs(128)), config,
                                 tmp_path / "rm", eval_data=RewardData(thumbs=thumbs(60)))
    assert metrics["eval"]["thumbs"] == 60
    assert metrics["eval_thumb_accuracy"] >= 0.8
    assert metrics["eval_accuracy"] is None  # no pairs held out


def test_saving_over_a_model_replaces_it_whole(tiny_model_dir, tmp_path):
    model = new_reward_model(tiny_config(tiny_model_dir, lora_rank=4))
    save_reward_model(model, tmp_path / "rm", {"round": 1})
    model.bias = 3.0
    save_reward_model(model, tmp_path / "rm", {"round": 2})

    manifest = json.loads((tmp_path / "rm" / "reward_model.json").read_text())
    assert manifest["metrics"] == {"round": 2} and manifest["normalization"]["bias"] == 3.0
    assert manifest["config"]["lora_rank"] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["rm"]  # no staging or retired copies left


def test_held_out_split_keeps_a_prompt_on_one_side():
    prompt = [{"role": "user", "content": "same prompt"}]
    data = RewardData([ComparisonGroup(prompt, [PreferencePair(f"a{i}", f"b{i}")]) for i in range(5)]
                      + planted_rule_data(200, seed=9).groups)
    train, held = split_held_out(data, percent=20)
    sides = {id(g) in {id(h) for h in held.groups} for g in data.groups[:5]}
    assert len(sides) == 1
    assert 20 <= len(held.groups) <= 70
    assert split_held_out(data, percent=20)[1].groups == held.groups  # stable


def test_reads_trl_preference_jsonl(tmp_path):
    rows = [
        {"prompt": [{"role": "user", "content": "q1"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        {"prompt": [{"role": "user", "content": "q1"}], "chosen": "a", "rejected": "c"},
        {"prompt": "q2", "chosen": "x", "rejected": "y"},
        {"prompt": [{"role": "user", "content": "q3"}], "completion": "z", "label": False},
    ]
    path = tmp_path / "prefs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")

    data = read_preference_jsonl(path)

    assert data.counts() == {"groups": 2, "pairs": 3, "ties": 0, "thumbs": 1}
    assert data.groups[0].answers() == ["a", "b", "c"]
    assert data.thumbs[0].label == -1


def test_command_line_trains_from_a_preference_export(tiny_model_dir, tmp_path, capsys):
    from retrain.reward import main

    rows = [{"prompt": g.prompt, "chosen": g.pairs[0].chosen, "rejected": g.pairs[0].rejected}
            for g in planted_rule_data(24, seed=10).groups]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))

    main(["--data", str(path), "--out", str(tmp_path / "rm"), "--base-model", str(tiny_model_dir),
          "--lora-rank", "4", "--max-tokens", "48", "--held-out-percent", "25", "--normalization-samples", "8"])

    printed = json.loads(capsys.readouterr().out)
    assert printed["counts"]["pairs"] + printed["counts"]["eval_pairs"] == 24
    assert load_reward_model(tmp_path / "rm").config.max_tokens == 48
