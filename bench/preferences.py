"""Hidden preferences of simulated users: deterministic judges of an answer's text.

A `Preference` scores an answer (higher is preferred), decides a thumb (`likes`), and compares
two answers to the same prompt (`judge`). `SimulatedUser` votes by one preference, with a share
of random votes (`noise`), the way a person's feedback is partly arbitrary. `win_rate` is the
measure bench/loop.py reports: how often one policy's answers beat another's on the same
prompts under the preference, ties counting half.

- concise: fewer words is better; an empty answer is never preferred. Thumbs up at most
  `CONCISE_WORDS` words.
- plain: prose without list items, headings or bold markup is better (fewer such lines and
  marks). Thumbs up with none at all.
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

_LIST_ITEM = re.compile(r"^\s*(?:[-*+\u2022]|\d{1,2}[.)])\s+\S", re.MULTILINE)
_HEADING = re.compile(r"^\s*#{1,6}\s+\S", re.MULTILINE)
_BOLD = re.compile(r"\*\*[^*\n]+\*\*|__[^_\n]+__")


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


def markup_count(text: str) -> int:
    """List items, headings and bold spans: what a reader of plain prose does not want."""
    return len(_LIST_ITEM.findall(text)) + len(_HEADING.findall(text)) + len(_BOLD.findall(text))


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
            "plain",
            "plain prose: fewer list items, headings and bold marks is better; thumbs up with none",
            lambda text: -float(markup_count(text)) if text.strip() else float("-inf"),
            lambda text: bool(text.strip()) and markup_count(text) == 0,
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
