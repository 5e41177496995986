"""The gate's decision: reward must beat serving, KL must stay bounded, no degeneration."""

import pytest

from retrain.gate import GateConfig, decide, degeneration, repetitive

CONFIG = GateConfig()
HEALTHY = degeneration(["A fine answer."] * 10, [True] * 10, CONFIG)


def test_a_better_bounded_healthy_candidate_passes():
    decision = decide([1.0, 0.5, 0.2, 0.9], [0.0, 0.1, 0.3, 0.0], 2.0, HEALTHY, HEALTHY, CONFIG)
    assert decision.passed, decision.reasons
    assert decision.metrics["win_rate"] == 0.75
    assert "passed" in decision.summary()


def test_losing_on_reward_is_rejected_with_the_numbers():
    decision = decide([0.0, 0.0], [1.0, 1.0], 1.0, HEALTHY, HEALTHY, CONFIG)
    assert not decision.passed
    assert any("win rate 0.000" in r for r in decision.reasons)
    assert any("does not beat serving" in r for r in decision.reasons)


def test_ties_count_half():
    decision = decide([1.0, 1.0], [1.0, 1.0], 0.0, HEALTHY, HEALTHY, CONFIG)
    assert decision.metrics["win_rate"] == 0.5
    assert not decision.passed


def test_kl_over_the_bound_is_rejected():
    decision = decide([2.0], [0.0], CONFIG.max_kl + 0.1, HEALTHY, HEALTHY, CONFIG)
    assert decision.reasons == [f"KL to the reference {CONFIG.max_kl + 0.1:.3f} nats exceeds the bound {CONFIG.max_kl}"]


def test_degenerate_answers_are_rejected_even_with_high_reward():
    looping = "yes yes yes yes yes yes yes yes yes yes yes yes yes yes yes"
    candidate = degeneration(["", looping, looping, "ok"], [True, False, False, True], CONFIG)
    decision = decide([5.0] * 4, [0.0] * 4, 1.0, candidate, HEALTHY, CONFIG)
    assert not decision.passed
    joined = " | ".join(decision.reasons)
    assert "empty" in joined and "cut off without EOS" in joined and "repetitive" in joined


def test_repetition_detector():
    assert repetitive("the cat sat on the mat " * 5)
    assert not repetitive("Paris is the capital of France, and it lies on the Seine river in the north.")
    assert not repetitive("no no no")  # too short to judge


def test_mismatched_scores_are_an_error():
    with pytest.raises(ValueError):
        decide([1.0], [], 0.0, HEALTHY, HEALTHY, CONFIG)
