"""The gate: a candidate is promoted only if, on held-out logged prompts, its reward beats the
serving policy's, its KL to the reference stays under a bound, and it shows no degeneration.

This module holds the decision and the degeneration measures; the round generates the answers
and scores them. Every decision carries its numbers, so it can be recorded as it was made.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field


@dataclass
class GateConfig:
    min_win_rate: float = field(
        default=0.5,
        metadata={"help": "Candidate must win more than this share of held-out prompts "
                          "against the serving policy under the reward model (ties count half)."},
    )
    min_reward_gain: float = field(
        default=0.0,
        metadata={"help": "Candidate's mean reward minus serving's must exceed this."},
    )
    max_kl: float = field(
        default=8.0,
        metadata={"help": "Bound on the candidate's mean per-answer KL to the reference "
                          "policy, in nats (sum over answer tokens)."},
    )
    max_empty_rate: float = field(
        default=0.05, metadata={"help": "Most answers allowed to be empty (or whitespace)."}
    )
    max_truncated_rate_increase: float = field(
        default=0.10,
        metadata={"help": "How much the share of answers cut off at max_new_tokens (no EOS) "
                          "may grow over the serving policy's."},
    )
    max_repetitive_rate: float = field(
        default=0.10,
        metadata={"help": "Most answers allowed to be repetitive (see repetitive())."},
    )
    repetition_ngram: int = field(
        default=3, metadata={"help": "n of the word n-grams used to detect repetition."}
    )
    min_distinct_ngram_ratio: float = field(
        default=0.5,
        metadata={"help": "An answer of at least 12 words whose distinct/total n-gram ratio is "
                          "below this is repetitive."},
    )


def repetitive(text: str, n: int = 3, min_distinct_ratio: float = 0.5) -> bool:
    """True for answers that loop: few distinct word n-grams among many."""
    words = text.split()
    if len(words) < 12:
        return False
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(Counter(grams)) / len(grams) < min_distinct_ratio


@dataclass
class Degeneration:
    empty_rate: float
    truncated_rate: float  # share of answers that hit max_new_tokens without EOS
    repetitive_rate: float
    eos_rate: float
    mean_words: float


def degeneration(answers: list[str], ended_with_eos: list[bool], config: GateConfig) -> Degeneration:
    if not answers:
        raise ValueError("degeneration needs at least one answer")
    count = len(answers)
    empty = sum(not a.strip() for a in answers)
    loops = sum(
        repetitive(a, config.repetition_ngram, config.min_distinct_ngram_ratio) for a in answers
    )
    eos = sum(ended_with_eos)
    return Degeneration(
        empty_rate=empty / count,
        truncated_rate=(count - eos) / count,
        repetitive_rate=loops / count,
        eos_rate=eos / count,
        mean_words=sum(len(a.split()) for a in answers) / count,
    )


@dataclass
class GateDecision:
    passed: bool
    reasons: list[str]  # why it failed; empty when it passed
    metrics: dict

    def summary(self) -> str:
        m = self.metrics
        head = "passed" if self.passed else "rejected: " + "; ".join(self.reasons)
        return (
            f"gate {head} (win rate {m['win_rate']:.3f}, reward {m['candidate_reward']:+.3f} vs "
            f"{m['serving_reward']:+.3f}, KL {m['kl']:.3f})"
        )


def decide(
    candidate_scores: list[float],
    serving_scores: list[float],
    kl: float,
    candidate: Degeneration,
    serving: Degeneration,
    config: GateConfig,
) -> GateDecision:
    """Compare candidate and serving answers to the same held-out prompts, prompt by prompt."""
    if len(candidate_scores) != len(serving_scores) or not candidate_scores:
        raise ValueError("the gate needs one candidate and one serving score per held-out prompt")
    wins = sum(
        1.0 if c > s else 0.5 if c == s else 0.0
        for c, s in zip(candidate_scores, serving_scores)
    )
    win_rate = wins / len(candidate_scores)
    candidate_reward = sum(candidate_scores) / len(candidate_scores)
    serving_reward = sum(serving_scores) / len(serving_scores)

    reasons = []
    if win_rate <= config.min_win_rate:
        reasons.append(f"win rate {win_rate:.3f} is not above {config.min_win_rate}")
    if candidate_reward - serving_reward <= config.min_reward_gain:
        reasons.append(
            f"mean reward {candidate_reward:+.3f} does not beat serving {serving_reward:+.3f} "
            f"by more than {config.min_reward_gain}"
        )
    if kl > config.max_kl:
        reasons.append(f"KL to the reference {kl:.3f} nats exceeds the bound {config.max_kl}")
    if candidate.empty_rate > config.max_empty_rate:
        reasons.append(f"{candidate.empty_rate:.0%} empty answers")
    if candidate.truncated_rate - serving.truncated_rate > config.max_truncated_rate_increase:
        reasons.append(
            f"{candidate.truncated_rate:.0%} answers cut off without EOS "
            f"(serving: {serving.truncated_rate:.0%})"
        )
    if candidate.repetitive_rate > config.max_repetitive_rate:
        reasons.append(f"{candidate.repetitive_rate:.0%} repetitive answers")

    metrics = {
        "win_rate": win_rate,
        "candidate_reward": candidate_reward,
        "serving_reward": serving_reward,
        "kl": kl,
        "prompts": len(candidate_scores),
        "candidate": asdict(candidate),
        "serving": asdict(serving),
        "config": asdict(config),
    }
    return GateDecision(passed=not reasons, reasons=reasons, metrics=metrics)
