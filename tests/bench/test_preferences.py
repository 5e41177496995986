"""The simulated users' hidden preferences: deterministic judges, noisy voters, the win rate."""

from __future__ import annotations

import random

import pytest
from bench.loop import split_prompts, load_prompts
from bench.preferences import PREFERENCES, SimulatedUser, ends_with_question, reading_ease, syllables, win_rate

concise, simple, question = PREFERENCES["concise"], PREFERENCES["simple"], PREFERENCES["question"]
verbose = PREFERENCES["verbose"]


def test_concise_prefers_fewer_words_and_never_an_empty_answer():
    assert concise.judge("Boil it for six minutes.", "Boil the egg for six minutes, then cool it.") == "better"
    assert concise.judge("One two three.", "Four five six.") == "same"
    assert concise.judge("", "A long answer that goes on and on.") == "worse"
    assert concise.likes("Short and sweet.") and not concise.likes("") and not concise.likes("word " * 61)


def test_verbose_is_the_opposite_of_concise_and_never_prefers_an_empty_answer():
    short, longer = "Boil it for six minutes.", "Boil the egg for six minutes, then cool it."
    assert verbose.judge(longer, short) == "better" == concise.judge(short, longer)
    assert verbose.judge("One two three.", "Four five six.") == "same"
    assert verbose.judge("", "Yes.") == "worse"
    assert verbose.likes("word " * 80) and not verbose.likes("word " * 79) and not verbose.likes("")


def test_simple_prefers_short_sentences_and_short_words():
    assert [syllables(w) for w in ("cat", "water", "make", "little", "communication")] == [1, 2, 1, 2, 5]
    easy = "Boil the egg. Wait six minutes. Cool it in cold water."
    hard = ("Consider implementing a comprehensive, systematic methodology, incorporating "
            "temperature considerations and approximately six minutes of immersion.")
    assert reading_ease(easy) > 90 > 0 > reading_ease(hard)
    assert simple.judge(easy, hard) == "better" and simple.likes(easy) and not simple.likes(hard)
    assert reading_ease("") == float("-inf") and not simple.likes("...")
    # a line break ends a sentence: a list reads as short sentences
    assert reading_ease("Rinse the rice\nBoil it\nServe it") > reading_ease("Rinse the rice boil it serve it")


def test_question_looks_at_the_end_only():
    assert ends_with_question("Try a warm bath. Would that help?")
    assert ends_with_question('Do you like it?" ')
    assert not ends_with_question("Why is the sky blue? Because of scattering.")
    assert question.judge("Sure. Want more tips?", "Sure.") == "better"


def test_users_vote_by_their_preference_and_noise_is_a_share_of_coin_tosses():
    honest = SimulatedUser(concise, 0.0, random.Random(1))
    assert {honest.thumb("Short.") for _ in range(50)} == {1}
    assert {honest.compare("Short.", "A much longer answer.") for _ in range(50)} == {"better"}

    noisy = SimulatedUser(concise, 0.3, random.Random(1))
    votes = [noisy.compare("Short.", "A much longer answer.") for _ in range(4000)]
    assert 0.13 < votes.count("worse") / len(votes) < 0.17  # half of the 30% random votes
    with pytest.raises(ValueError, match="between 0 and 1"):
        SimulatedUser(concise, 1.5, random.Random(1))


def test_win_rate_counts_ties_half_and_pairs_by_prompt():
    assert win_rate(concise, ["a", "a b c", "a b"], ["a b", "a", "a b"]) == pytest.approx(0.5)
    assert win_rate(concise, ["a", "a"], ["a b", "a b"]) == 1.0
    with pytest.raises(ValueError, match="one answer and one baseline"):
        win_rate(concise, ["a"], [])


def test_the_prompt_set_is_large_varied_and_split_stably():
    prompts = load_prompts()
    assert len(prompts) >= 200 and len(set(prompts)) == len(prompts)
    training, held_out = split_prompts(prompts, 40)
    assert len(held_out) == 40 and not set(training) & set(held_out)
    assert split_prompts(list(reversed(prompts)), 40)[1] == list(reversed(held_out))
