"""The gate's decision: reward must beat serving by more than chance under a judge that is
accurate enough, KL must stay bounded, no degeneration, and NaN fails."""

import math

import pytest

from retrain.gate import GateConfig, decide, degeneration, repetitive, thumb_ranking, win_rate_lower_bound

CONFIG = GateConfig()
HEALTHY = degeneration(["A fine answer."] * 10, [True] * 10, CONFIG)
TRUSTED = {"reward_accuracy": 0.8, "reward_pairs": 20}  # a judge that passes the floor
# 10 wins of 12: the candidate scores 1 where serving scores 0, and loses twice.
WINNING = ([1.0] * 10 + [0.0, 0.0], [0.0] * 10 + [1.0, 1.0])


def test_a_better_bounded_healthy_candidate_passes_with_its_numbers():
    decision = decide(*WINNING, 2.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert decision.passed, decision.reasons
    m = decision.metrics
    assert m["win_rate"] == pytest.approx(10 / 12)
    # Wilson, two-sided 80% (one-sided 90%), 10 of 12, by hand: z = 1.281552, z^2 = 1.642374,
    # centre (0.833333 + z^2/24) / (1 + z^2/12) = 0.901766 / 1.136865 = 0.793204, half-width
    # z sqrt(0.833333 * 0.166667 / 12 + z^2/576) / 1.136865 = 0.135392: lower 0.657813.
    assert m["win_rate_lower"] == pytest.approx(0.657813, abs=1e-6)
    assert (m["reward_accuracy"], m["reward_pairs"], m["users_on_serving_answers"]) == (0.8, 20, None)
    assert "passed" in decision.summary() and "at least 0.658" in decision.summary()


def test_the_win_rate_needs_a_confidence_bound_not_a_raw_share():
    """5 of 5 prompts is a raw 1.00 but only 'at least 0.75' with 90% confidence (Wilson:
    centre (1 + z^2/10) / (1 + z^2/5) = 1.164237 / 1.328475 = 0.876371, half-width
    z sqrt(z^2/100) / 1.328475 = 0.123629). 8 of 12 (0.67) is at least 0.48: rejected."""
    assert win_rate_lower_bound(5, 5, 0.9) == pytest.approx(0.752743, abs=1e-6)
    assert win_rate_lower_bound(8, 12, 0.5) == pytest.approx(8 / 12)  # 0.5: the raw share
    eight_of_twelve = ([1.0] * 8 + [0.0] * 4, [0.0] * 8 + [1.0] * 4)
    decision = decide(*eight_of_twelve, 1.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert not decision.passed
    assert decision.reasons == ["win rate 0.667 on 12 prompts is at least 0.482 with 90% confidence, not above 0.5"]


def test_losing_on_reward_is_rejected_with_the_numbers():
    decision = decide([0.0, 0.0], [1.0, 1.0], 1.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert not decision.passed
    assert any("win rate 0.000" in r for r in decision.reasons)
    assert any("does not beat serving" in r for r in decision.reasons)


def test_ties_count_half():
    decision = decide([1.0, 1.0], [1.0, 1.0], 0.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert decision.metrics["win_rate"] == 0.5
    assert not decision.passed


def test_a_judge_below_the_accuracy_floor_or_tested_on_too_few_pairs_is_not_trusted():
    weak = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, reward_accuracy=0.42, reward_pairs=20)
    assert weak.reasons == ["the reward model's held-out accuracy 0.420 on 20 pairs is below 0.6"]
    few = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, reward_accuracy=1.0, reward_pairs=5)
    assert few.reasons == ["the reward model's accuracy is measured on 5 held-out pairs (need 8): an untested judge"]
    no_coin_test = GateConfig(reward_accuracy_confidence=0.5)
    at_floor = decide(*WINNING, 1.0, HEALTHY, HEALTHY, no_coin_test, reward_accuracy=0.6, reward_pairs=8)
    assert at_floor.passed, at_floor.reasons
    # 0.5 turns the coin test off: a judge at a coin's 0.5 is then held to the floor alone.
    no_floor = GateConfig(reward_accuracy_confidence=0.5, min_reward_accuracy=0.0)
    coin = decide(*WINNING, 1.0, HEALTHY, HEALTHY, no_floor, reward_accuracy=0.5, reward_pairs=8)
    assert coin.passed, coin.reasons


def test_a_judge_must_beat_a_coin_with_confidence_not_only_clear_the_floor():
    """8 of 13 pairs (0.615) clears the 0.6 floor, and a coin-toss judge scored it in the loop.
    Wilson, one-sided 90%, by hand: z^2 = 1.642374, centre (0.615385 + z^2/26) / (1 + z^2/13)
    = 0.678553 / 1.126336 = 0.602443, half-width z sqrt(0.615385 * 0.384615 / 13 + z^2/676)
    / 1.126336 = 0.163450: at least 0.438992, not above 0.5. 29 of 43 (0.674) is at least 0.578."""
    coin_like = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, reward_accuracy=8 / 13, reward_pairs=13)
    assert coin_like.metrics["judge_accuracy_lower"] == pytest.approx(0.438992, abs=1e-5)
    assert coin_like.reasons == ["the reward model's held-out accuracy 0.615 on 13 pairs is at least 0.439 with "
                                 "90% confidence: not told apart from a coin"]
    assert "judge 0.62 on 13 pairs, at least 0.44" in coin_like.summary()
    better = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, reward_accuracy=29 / 43, reward_pairs=43)
    assert better.passed, better.reasons
    assert better.metrics["judge_accuracy_lower"] > 0.5


def test_thumb_ranking_is_the_share_of_up_down_pairs_in_the_users_order():
    """Ups score 3, 1; downs 2, 1, 0. Of the 6 (up, down) pairs, 3 > 2, 3 > 1, 3 > 0, 1 > 0 are in
    order, 1 < 2 is not, 1 = 1 counts half: 4.5 / 6 = 0.75, weighed as min(2, 3) = 2. The sign
    rule would call all five answers but the last 'up' and be right on 3 of 5 whatever it knew."""
    ranking = thumb_ranking([3.0, 2.0, 1.0, 1.0, 0.0], [True, False, True, False, False])
    assert ranking == {"auc": 0.75, "ups": 2, "downs": 3, "weight": 2}
    assert thumb_ranking([1.0, 2.0], [True, True]) is None  # nothing to rank against
    assert thumb_ranking([2.0, 1.0], [True, False])["auc"] == 1.0


def test_held_out_thumbs_count_beside_the_pairs_in_the_judge_check():
    """Day 1 of the loop: 6 of 13 pairs right, thumbs ranked 0.85 over 12 up and 14 down. Alone,
    13 pairs at 0.46 fail; counted with 12 weighed thumb comparisons: (6 + 10.2) / 25 = 0.648,
    Wilson one-sided 90% by hand: z^2 = 1.642374, centre (0.648 + z^2/50) / (1 + z^2/25)
    = 0.680847 / 1.065695 = 0.638876, half-width z sqrt(0.648 * 0.352 / 25 + z^2/2500)
    / 1.065695 = 0.126744 / 1.065695 = 0.118931: at least 0.519945, above a coin."""
    day_one = {"reward_accuracy": 6 / 13, "reward_pairs": 13}
    good_thumbs = {"auc": 0.85, "ups": 12, "downs": 14, "weight": 12}
    pairs_only = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, **day_one)
    assert pairs_only.reasons == ["the reward model's held-out accuracy 0.462 on 13 pairs is below 0.6"]
    both = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, **day_one, thumbs=good_thumbs)
    assert both.passed, both.reasons
    m = both.metrics
    assert (m["judge_accuracy"], m["judge_verdicts"], m["thumb_ranking"]) == (pytest.approx(0.648), 25, good_thumbs)
    assert m["judge_accuracy_lower"] == pytest.approx(0.519945, abs=1e-5)
    assert "judge 0.65 on 25 verdicts, at least 0.52" in both.summary()
    # Thumbs a coin ranks do not lift a coin's pairs: (6 + 6) / 25 = 0.48.
    coin_thumbs = {"auc": 0.5, "ups": 12, "downs": 14, "weight": 12}
    coin = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, **day_one, thumbs=coin_thumbs)
    assert coin.reasons == ["the reward model's held-out accuracy 0.480 on 25 verdicts (13 pairs; thumbs ranked "
                            "0.500 over 12 up and 14 down, weighed as 12) is below 0.6"]
    # Turned off, the thumbs are recorded and not counted.
    off = decide(*WINNING, 1.0, HEALTHY, HEALTHY, GateConfig(judge_counts_thumbs=False), **day_one, thumbs=good_thumbs)
    assert off.reasons == pairs_only.reasons and off.metrics["thumb_ranking"] == good_thumbs
    # Thumbs alone can make a judge tested: 5 pairs + 4 weighed = 9 >= 8.
    few_pairs = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, reward_accuracy=1.0, reward_pairs=5,
                       thumbs={"auc": 1.0, "ups": 4, "downs": 9, "weight": 4})
    assert few_pairs.passed, few_pairs.reasons
    nan_thumbs = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED,
                        thumbs={"auc": math.nan, "ups": 4, "downs": 9, "weight": 4})
    assert nan_thumbs.reasons == ["the reward model's thumbs ranking is not a finite number (nan)"]


def test_kl_over_the_bound_is_rejected():
    decision = decide(*WINNING, CONFIG.max_kl + 0.1, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert decision.reasons == [f"KL to the reference {CONFIG.max_kl + 0.1:.3f} nats exceeds the bound {CONFIG.max_kl}"]


def test_nan_anywhere_fails():
    """Issue 13: `kl > max_kl` is False for NaN, so a NaN KL used to pass."""
    nan = math.nan
    kl = decide(*WINNING, nan, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert kl.reasons == ["the KL is not a finite number (nan)"]
    scores = decide([nan] + WINNING[0][1:], WINNING[1], 1.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert not scores.passed and "a candidate score is not a finite number (nan)" in scores.reasons
    serving = decide(WINNING[0], [math.inf] + WINNING[1][1:], 1.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
    assert "a serving score is not a finite number (inf)" in serving.reasons
    judge = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, reward_accuracy=nan, reward_pairs=20)
    assert judge.reasons == ["the reward model's accuracy is not a finite number (nan)"]


def test_the_users_verdicts_on_serving_answers_are_recorded_with_the_decision():
    users = {"version": "base", "accuracy": 0.75, "pairs": 4, "thumbs": 0}
    decision = decide(*WINNING, 1.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED, users=users)
    assert decision.metrics["users_on_serving_answers"] == users


def test_degenerate_answers_are_rejected_even_with_high_reward():
    looping = "yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes"
    candidate = degeneration(["", looping, looping, "ok"], [True, False, False, True], CONFIG)
    decision = decide([5.0] * 12, [0.0] * 12, 1.0, candidate, HEALTHY, CONFIG, **TRUSTED)
    assert not decision.passed
    joined = " | ".join(decision.reasons)
    assert "empty" in joined and "cut off without EOS" in joined and "repetitive" in joined


def test_repetition_detector():
    assert repetitive("the cat sat on the mat " * 5)
    assert not repetitive("Paris is the capital of France, and it lies on the Seine river in the north.")
    assert not repetitive("no no no")  # too short to judge


def test_mismatched_scores_are_an_error():
    with pytest.raises(ValueError):
        decide([1.0], [], 0.0, HEALTHY, HEALTHY, CONFIG, **TRUSTED)
