"""The simulated users' hidden preferences: deterministic judges, noisy voters, the win rate."""

from __future__ import annotations

import random

import pytest
from bench.loop import split_prompts, load_prompts
from bench.preferences import (
    PREFERENCES, SimulatedUser, ends_with_question, reading_ease, sentences, syllables, win_rate,
)

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


# -- rewrites: the answer a user with the preference would type instead --------------------------

ANSWERS = [
    "Watering a plant properly is actually very important, and you should utilize room-temperature "
    "water. Additionally, individuals frequently overwater their plants; therefore check the soil first. "
    "Finally, make sure the pot drains.",
    "Boil the egg for six minutes. Then cool it in cold water for a minute, which stops the cooking. "
    "Peel it under running water.",
    "Sure! Here are some ideas:\n1. Fried rice with chicken\n2. Chicken curry with rice\n3. A rice bowl",
]
PROMPTS = ["How often should I water my houseplants?", "How long should I boil an egg for a soft yolk?",
           "What should I cook for dinner tonight with chicken and rice?"]


@pytest.mark.parametrize("name", sorted(PREFERENCES))
def test_each_rewrite_is_what_its_preference_prefers(name):
    preference = PREFERENCES[name]
    for answer, prompt in zip(ANSWERS, PROMPTS):
        wanted = preference.rewrite(answer, prompt)
        assert wanted.strip()
        assert preference.judge(wanted, answer) != "worse", (name, wanted)
        assert preference.likes(wanted), (name, wanted)
    # The long answers get better; a list of short items may already be what `simple` wants.
    for answer, prompt in zip(ANSWERS[:2], PROMPTS[:2]):
        assert preference.judge(preference.rewrite(answer, prompt), answer) == "better", name


def test_concise_keeps_the_first_sentences_as_written():
    assert concise.rewrite(ANSWERS[1], PROMPTS[1]) == (
        "Boil the egg for six minutes. Then cool it in cold water for a minute, which stops the cooking.")
    assert concise.rewrite("Short answer.", "q") == "Short answer."  # nothing to cut


def test_question_adds_a_short_relevant_question_back():
    wanted = question.rewrite(ANSWERS[1], PROMPTS[1])
    assert wanted.startswith("Boil the egg for six minutes.") and ends_with_question(wanted)
    added = sentences(wanted)[-1]
    assert len(added.split()) <= 12 and "yolk" in added  # short, and about what was asked
    assert question.rewrite("", "Any tips for sleeping better?").endswith("sleeping?")
    assert question.rewrite("Fine. Want more?", "q") == "Fine. Want more?"  # already what it wants


def test_simple_splits_sentences_and_swaps_long_words():
    wanted = simple.rewrite(ANSWERS[0], PROMPTS[0])
    assert "utilize" not in wanted and "use room-temperature water" in wanted
    assert max(len(s.split()) for s in wanted.split(". ")) <= 8
    assert reading_ease(wanted) > reading_ease(ANSWERS[0]) + 20


def test_users_edit_a_share_of_answers_and_never_to_the_same_text():
    editor = SimulatedUser(question, 0.0, random.Random(3), edits=0.25)
    edits = [editor.edit("Sure.", "Any tips for sleeping better?") for _ in range(4000)]
    assert 0.22 < sum(e is not None for e in edits) / len(edits) < 0.28
    assert {e for e in edits if e is not None} == {"Sure. " + question.rewrite("", "Any tips for sleeping better?")}
    always = SimulatedUser(question, 0.0, random.Random(3), edits=1.0)
    assert always.edit("Done. Anything else?", "q") is None  # nothing to change
    assert SimulatedUser(question, 0.0, random.Random(3)).edit("Sure.", "q") is None  # edits 0: never
    with pytest.raises(ValueError, match="edits"):
        SimulatedUser(question, 0.0, random.Random(3), edits=-0.1)
