"""Hidden preferences of simulated users: deterministic judges of an answer's text.

A `Preference` scores an answer (higher is preferred), decides a thumb (`likes`), and compares
two answers to the same prompt (`judge`). `SimulatedUser` votes by one preference, with a share
of random votes (`noise`), the way a person's feedback is partly arbitrary. `win_rate` is the
measure bench/loop.py reports: how often one policy's answers beat another's on the same
prompts under the preference, ties counting half.

- concise: fewer words is better; an empty answer is never preferred. Thumbs up at most
  `CONCISE_WORDS` words.
- verbose: more words is better, the opposite of concise: the control that shows whether the
  loop follows the votes or its own recipe (which leans towards shorter answers: the no-EOS
  penalty, the gate's truncation check). Thumbs up at `VERBOSE_WORDS` words or more.
- simple: plain language is better: a higher Flesch reading ease (short sentences, short
  words). Thumbs up at `SIMPLE_READING_EASE` or more ("fairly easy" and easier).
- question: an answer that ends with a question back to the user is better. Thumbs up when it
  does. (SmolLM2-135M almost never does this on its own: 0 of 32 sampled answers in a probe,
  so PPO has nothing to reinforce; see README's loop results.)
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

CONCISE_WORDS = 60
VERBOSE_WORDS = 80
SIMPLE_READING_EASE = 70.0

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_VOWEL_GROUPS = re.compile(r"[aeiouy]+")
# A sentence ends at . ! ? or a line break (list items and headings read as sentences too).
_SENTENCE_END = re.compile(r"[.!?]+(?=\s|$)|\n+")


@dataclass(frozen=True)
class Preference:
    name: str
    description: str
    score: Callable[[str], float]  # higher is preferred
    likes: Callable[[str], bool]  # the thumb: up when true

    def judge(self, answer: str, other: str) -> str:
        """`answer` against `other`: "better", "worse" or "same" (the compare frame's verdict)."""
        a, b = self.score(answer), self.score(other)
        return "better" if a > b else "worse" if a < b else "same"


def words(text: str) -> int:
    return len(text.split())


def _concise_score(text: str) -> float:
    count = words(text)
    return -float(count) if count else float("-inf")


def syllables(word: str) -> int:
    """Vowel groups, less a silent final e: the usual estimate behind readability scores."""
    word = word.lower()
    count = len(_VOWEL_GROUPS.findall(word))
    if word.endswith("e") and not word.endswith(("le", "ee")) and count > 1:
        count -= 1
    return max(count, 1)


def reading_ease(text: str) -> float:
    """Flesch reading ease: 206.835 - 1.015 words/sentence - 84.6 syllables/word. Higher is
    easier (60-70 plain English, 70-80 fairly easy); an answer with no words scores -inf."""
    found = _WORD.findall(text)
    if not found:
        return float("-inf")
    sentences = max(1, len([part for part in _SENTENCE_END.split(text) if _WORD.search(part)]))
    return 206.835 - 1.015 * len(found) / sentences - 84.6 * sum(map(syllables, found)) / len(found)


def ends_with_question(text: str) -> bool:
    stripped = text.rstrip().rstrip("\"')]*_ ")
    return stripped.endswith("?")


PREFERENCES: dict[str, Preference] = {
    p.name: p
    for p in (
        Preference(
            "concise",
            f"fewer words is better; thumbs up at most {CONCISE_WORDS} words",
            _concise_score,
            lambda text: 0 < words(text) <= CONCISE_WORDS,
        ),
        Preference(
            "verbose",
            f"more words is better; thumbs up at {VERBOSE_WORDS} words or more",
            lambda text: float(words(text)) if words(text) else float("-inf"),
            lambda text: words(text) >= VERBOSE_WORDS,
        ),
        Preference(
            "simple",
            f"plain language: higher Flesch reading ease is better; thumbs up at {SIMPLE_READING_EASE:g} or more",
            reading_ease,
            lambda text: reading_ease(text) >= SIMPLE_READING_EASE,
        ),
        Preference(
            "question",
            "an answer that ends with a question back to the user is better; thumbs up when it does",
            lambda text: 1.0 if ends_with_question(text) else 0.0,
            ends_with_question,
        ),
    )
}


class SimulatedUser:
    """Votes by a hidden preference; a `noise` share of votes is a coin toss instead."""

    def __init__(self, preference: Preference, noise: float, rng: random.Random):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise is a share of votes, between 0 and 1, not {noise}")
        self.preference = preference
        self.noise = noise
        self.rng = rng

    def thumb(self, answer: str) -> int:
        if self.rng.random() < self.noise:
            return self.rng.choice((1, -1))
        return 1 if self.preference.likes(answer) else -1

    def compare(self, answer: str, other: str) -> str:
        if self.rng.random() < self.noise:
            return self.rng.choice(("better", "worse"))
        return self.preference.judge(answer, other)


def win_rate(preference: Preference, answers: Sequence[str], baseline: Sequence[str]) -> float:
    """Share of prompts where `answers[i]` beats `baseline[i]` under the preference (ties: half)."""
    if len(answers) != len(baseline) or not answers:
        raise ValueError("win_rate needs one answer and one baseline answer per prompt")
    points = {"better": 1.0, "same": 0.5, "worse": 0.0}
    return sum(points[preference.judge(a, b)] for a, b in zip(answers, baseline)) / len(answers)
