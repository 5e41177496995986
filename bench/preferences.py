"""Hidden preferences of simulated users: deterministic judges of an answer's text.

A `Preference` scores an answer (higher is preferred), decides a thumb (`likes`), compares two
answers to the same prompt (`judge`), and rewrites an answer into the one it wants (`rewrite`,
what a person editing the answer would type: a demonstration). `SimulatedUser` votes by one
preference, with a share of random votes (`noise`), the way a person's feedback is partly
arbitrary, and on a share of conversations (`edits`) first edits the answer. `win_rate` is the
measure bench/loop.py reports: how often one policy's answers beat another's on the same
prompts under the preference, ties counting half.

- concise: fewer words is better; an empty answer is never preferred. Thumbs up at most
  `CONCISE_WORDS` words. Rewrite: the answer cut to its first sentences.
- verbose: more words is better, the opposite of concise: the control that shows whether the
  loop follows the votes or its own recipe (which leans towards shorter answers: the no-EOS
  penalty, the gate's truncation check). Thumbs up at `VERBOSE_WORDS` words or more. Rewrite:
  the answer kept whole and followed by a sentence that offers more on the prompt's topic.
- simple: plain language is better: a higher Flesch reading ease (short sentences, short
  words). Thumbs up at `SIMPLE_READING_EASE` or more ("fairly easy" and easier). Rewrite:
  long sentences split at their clauses, long words swapped for short ones, fillers dropped.
- question: an answer that ends with a question back to the user is better. Thumbs up when it
  does. Rewrite: the answer's first sentences plus a short question back about the topic of
  the user's prompt. (SmolLM2-135M almost never does this on its own: 0 of 32 sampled answers in a probe,
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
    rewrite: Callable[[str, str], str]  # (answer, the user's prompt) -> the answer wanted

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


# -- rewrites: what a person with the preference would type over the answer ----------------------

CONCISE_SENTENCE_WORDS = 12  # a concise rewrite keeps sentences until it has this many words


def sentences(text: str) -> list[str]:
    """The text's sentences, each with its end mark (a line break ends one too)."""
    found, start = [], 0
    for match in _SENTENCE_END.finditer(text):
        piece = text[start : match.end()].strip()
        if _WORD.search(piece):
            found.append(piece)
        start = match.end()
    tail = text[start:].strip()
    if _WORD.search(tail):
        found.append(tail)
    return found


def first_sentences(text: str, min_words: int = CONCISE_SENTENCE_WORDS) -> str:
    kept: list[str] = []
    for sentence in sentences(text):
        kept.append(sentence)
        if words(" ".join(kept)) >= min_words:
            break
    return " ".join(kept)


def _concise_rewrite(answer: str, prompt: str) -> str:
    return first_sentences(answer) or answer


_STOPWORDS = frozenset(
    "a an the and or but if of to in on at for with about from by as is are was were be been do does "
    "did can could would should will shall may might must i me my you your we our they them their it "
    "its this that these those what which who whom whose how why when where there here some any all "
    "more most much many very so just not no yes please tell explain give write make list describe "
    "help want need know like get have has had best good way ways some into out over up down often "
    "ever than then also only well really things thing something long short quick simple easy "
    "tonight today tomorrow keep use make always never sometimes every each".split()
)
_QUESTIONS_BACK = (
    "Would you like more detail about {topic}?",
    "What do you already know about {topic}?",
    "Is there a part of {topic} you want me to explain?",
    "Do you want an example of {topic}?",
)


def topic(prompt: str) -> str:
    """The prompt's main subject, for a relevant question back: its longest content word (the
    later one on a tie: questions tend to end on their subject)."""
    content = [w for w in _WORD.findall(prompt) if w.lower() not in _STOPWORDS and len(w) > 2]
    return max(reversed(content), key=len).lower() if content else "this"


def _question_rewrite(answer: str, prompt: str) -> str:
    body = first_sentences(answer, 2 * CONCISE_SENTENCE_WORDS)
    if ends_with_question(body):
        return body
    template = _QUESTIONS_BACK[int.from_bytes(prompt.encode()[:4].ljust(4), "big") % len(_QUESTIONS_BACK)]
    question = template.format(topic=topic(prompt))
    return f"{body} {question}" if body else question


_MORE_ABOUT = (
    "There is more to say about {topic}, and the details matter as much as the main idea.",
    "To go a little deeper into {topic}: it helps to know why each step works, not only what it is.",
    "A common mistake with {topic} is to stop at the first answer, so it is worth checking the exceptions too.",
    "If you want to learn more about {topic}, trying it yourself and comparing the results is the best teacher.",
)


def _verbose_rewrite(answer: str, prompt: str) -> str:
    # What a person who wants more would write: the whole answer, then more about its subject,
    # until it is as long as the thumb asks for.
    about = topic(prompt)
    out = answer.strip()
    for n in range(4 * len(_MORE_ABOUT)):
        if words(out) >= VERBOSE_WORDS:
            break
        out = f"{out} {_MORE_ABOUT[n % len(_MORE_ABOUT)].format(topic=about)}".strip()
    return out


# Long words and the short ones a plain-language editor puts in their place.
_PLAIN_WORDS = {
    "utilize": "use", "utilise": "use", "approximately": "about", "additionally": "also",
    "furthermore": "also", "moreover": "also", "however": "but", "therefore": "so",
    "consequently": "so", "individuals": "people", "individual": "person", "numerous": "many",
    "sufficient": "enough", "assistance": "help", "demonstrate": "show", "purchase": "buy",
    "commence": "start", "obtain": "get", "require": "need", "requires": "needs",
    "important": "key", "especially": "most of all", "particularly": "most of all",
    "different": "other", "various": "many", "beneficial": "good", "significant": "big",
    "significantly": "a lot", "frequently": "often", "immediately": "now", "difficult": "hard",
    "information": "facts", "understand": "get", "experience": "feel", "environment": "place",
    "recommend": "suggest", "activities": "things to do", "delicious": "tasty",
    "properly": "well", "completely": "fully", "vegetables": "greens",
    "ingredients": "things you need", "nutritious": "healthy", "comfortable": "at ease",
    "appropriate": "right", "available": "at hand", "possibility": "chance", "probably": "likely",
}
_FILLERS = frozenset("very really basically actually generally typically usually quite extremely".split())
_CLAUSE_BREAK = re.compile(r",\s+(?:and|but|which|so|because|while)\s+|;\s+|:\s+|,\s+")


def _plain_word(match: re.Match) -> str:
    word = match.group(0)
    plain = _PLAIN_WORDS.get(word.lower())
    if plain is None:
        return word
    return plain.capitalize() if word[0].isupper() else plain


def _simple_rewrite(answer: str, prompt: str) -> str:
    out = []
    for sentence in sentences(answer):
        sentence = _WORD.sub(_plain_word, sentence)
        sentence = " ".join(w for w in sentence.split() if w.lower().strip(",.!?") not in _FILLERS)
        end = sentence[-1] if sentence[-1] in ".!?" else "."
        pending = ""  # a clause of one or two words ("Also") joins the next one
        for clause in _CLAUSE_BREAK.split(sentence.rstrip(".!?:;,")):
            clause = f"{pending} {clause.strip()}".strip()
            if words(clause) < 3:
                pending = clause
                continue
            pending = ""
            out.append(clause[0].upper() + clause[1:] + end)
        if _WORD.search(pending):
            out.append(pending[0].upper() + pending[1:] + end)
    return " ".join(out) or answer


PREFERENCES: dict[str, Preference] = {
    p.name: p
    for p in (
        Preference(
            "concise",
            f"fewer words is better; thumbs up at most {CONCISE_WORDS} words",
            _concise_score,
            lambda text: 0 < words(text) <= CONCISE_WORDS,
            _concise_rewrite,
        ),
        Preference(
            "verbose",
            f"more words is better; thumbs up at {VERBOSE_WORDS} words or more",
            lambda text: float(words(text)) if words(text) else float("-inf"),
            lambda text: words(text) >= VERBOSE_WORDS,
            _verbose_rewrite,
        ),
        Preference(
            "simple",
            f"plain language: higher Flesch reading ease is better; thumbs up at {SIMPLE_READING_EASE:g} or more",
            reading_ease,
            lambda text: reading_ease(text) >= SIMPLE_READING_EASE,
            _simple_rewrite,
        ),
        Preference(
            "question",
            "an answer that ends with a question back to the user is better; thumbs up when it does",
            lambda text: 1.0 if ends_with_question(text) else 0.0,
            ends_with_question,
            _question_rewrite,
        ),
    )
}


class SimulatedUser:
    """Votes by a hidden preference; a `noise` share of votes is a coin toss instead. On an
    `edits` share of conversations the user first rewrites the answer into the one wanted."""

    def __init__(self, preference: Preference, noise: float, rng: random.Random, edits: float = 0.0):
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"noise is a share of votes, between 0 and 1, not {noise}")
        if not 0.0 <= edits <= 1.0:
            raise ValueError(f"edits is a share of conversations, between 0 and 1, not {edits}")
        self.preference = preference
        self.noise = noise
        self.edits = edits
        self.rng = rng

    def edit(self, answer: str, prompt: str) -> str | None:
        """The answer this user would write instead, on an `edits` share of calls; None: no
        edit this time (not chosen, or the answer is already what the preference wants)."""
        if self.edits == 0.0 or self.rng.random() >= self.edits:
            return None
        wanted = self.preference.rewrite(answer, prompt).strip()
        return wanted if wanted and wanted != answer.strip() else None

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
