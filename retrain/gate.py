"""The gate: a candidate is promoted only if, on held-out logged prompts, its reward beats the
serving policy's by more than chance, the reward model judging it is itself accurate enough on
held-out pairs to be trusted, its KL to the reference stays under a bound, and it shows no
degeneration. A number that is not a number (NaN, inf) fails whatever it is.

The judge is the reward model PPO just optimised against, so its win rate alone can be met by
fooling it: hence the floor on its accuracy on the users' held-out comparisons (a share, and
a confidence bound that must clear a coin's 0.5), and the confidence bound (5 wins of 5 prompts is not "1.00", it is "at least 0.69 with 90%
confidence"). The users' own verdicts on the serving policy's held-out answers, when there are
any, are reported beside: how the judge ranks what the users judged.

This module holds the decision and the degeneration measures; the round generates the answers
and scores them. Every decision carries its numbers, so it can be recorded as it was made.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import asdict, dataclass, field

from deploy.canary import wilson_interval


@dataclass
class GateConfig:
    min_win_rate: float = field(
        default=0.5,
        metadata={"help": "The lower confidence bound of the candidate's win rate against the serving "
                          "policy on held-out prompts, under the reward model (ties count half), must "
                          "be above this."},
    )
    win_rate_confidence: float = field(
        default=0.9,
        metadata={"help": "One-sided confidence of that lower bound (a Wilson score bound); 0.5 uses "
                          "the raw share."},
    )
    min_reward_accuracy: float = field(
        default=0.6,
        metadata={"help": "The reward model's pairwise accuracy on the held-out side's comparisons must "
                          "be at least this for its verdict to count."},
    )
    reward_accuracy_confidence: float = field(
        default=0.9,
        metadata={"help": "The judge must also beat a coin with this one-sided confidence: the lower "
                          "Wilson bound of its held-out accuracy must be above 0.5. A floor on the raw "
                          "share alone let coin-toss votes through: 8 of 13 pairs (0.62) is at least 0.44, "
                          "and the loop's coin-toss control scored exactly that on day 1. 0.5 turns it off."},
    )
    min_reward_pairs: int = field(
        default=8,
        metadata={"help": "Fewest held-out comparison pairs that accuracy must be measured on (fewer: "
                          "the judge is untested and the candidate is rejected)."},
    )
    min_reward_gain: float = field(
        default=0.0,
        metadata={"help": "Candidate's mean reward minus serving's must exceed this."},
    )
    max_kl: float = field(
        default=20.0,
        metadata={"help": "Bound on the candidate's mean per-answer KL to the reference "
                          "policy (the base model: cumulative over rounds), in nats (sum over answer "
                          "tokens) of its greedy answers. Above ppo.max_kl (16, sampled): greedy "
                          "answers measured 1.2-1.3x the sampled KL in the loop."},
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
        accuracy = m["reward_accuracy"]
        judge = f"{accuracy:.2f} on {m['reward_pairs']} pairs" if accuracy is not None else "untested"
        if m.get("reward_accuracy_lower") is not None:
            judge += f", at least {m['reward_accuracy_lower']:.2f}"
        return (
            f"gate {head} (win rate {m['win_rate']:.3f}, at least {m['win_rate_lower']:.3f}; reward "
            f"{m['candidate_reward']:+.3f} vs {m['serving_reward']:+.3f}; KL {m['kl']:.3f}; judge {judge})"
        )


def win_rate_lower_bound(wins: float, prompts: int, confidence: float) -> float:
    """One-sided lower confidence bound of a win rate (or of a judge's accuracy: pairs ranked
    right of pairs): the lower end of the two-sided Wilson interval at 2 * confidence - 1
    (confidence 0.5: the share itself)."""
    if confidence <= 0.5:
        return wins / prompts
    return wilson_interval(wins, prompts, 2 * confidence - 1)[0]


def _not_numbers(named: dict[str, list[float]]) -> list[str]:
    return [f"{name} is not a finite number ({', '.join(map(str, bad))})"
            for name, values in named.items() if (bad := [v for v in values if not math.isfinite(v)])]


def decide(
    candidate_scores: list[float],
    serving_scores: list[float],
    kl: float,
    candidate: Degeneration,
    serving: Degeneration,
    config: GateConfig,
    *,
    reward_accuracy: float | None,
    reward_pairs: int,
    users: dict | None = None,
) -> GateDecision:
    """Compare candidate and serving answers to the same held-out prompts, prompt by prompt.

    reward_accuracy / reward_pairs: the judge's accuracy on the held-out side's comparisons and
    how many pairs it was measured on. users: how the judge ranks the users' own held-out
    verdicts on the serving policy's answers (recorded, not decided on)."""
    if len(candidate_scores) != len(serving_scores) or not candidate_scores:
        raise ValueError("the gate needs one candidate and one serving score per held-out prompt")
    prompts = len(candidate_scores)
    wins = sum(
        1.0 if c > s else 0.5 if c == s else 0.0
        for c, s in zip(candidate_scores, serving_scores)
    )
    win_rate = wins / prompts
    win_rate_lower = win_rate_lower_bound(wins, prompts, config.win_rate_confidence)
    candidate_reward = sum(candidate_scores) / prompts
    serving_reward = sum(serving_scores) / prompts
    reward_accuracy_lower = (
        win_rate_lower_bound(reward_accuracy * reward_pairs, reward_pairs, config.reward_accuracy_confidence)
        if reward_accuracy is not None and reward_pairs > 0 and math.isfinite(reward_accuracy) else None
    )

    reasons = _not_numbers({
        "a candidate score": candidate_scores, "a serving score": serving_scores, "the KL": [kl],
        "the reward model's accuracy": [] if reward_accuracy is None else [reward_accuracy],
    })
    if win_rate_lower <= config.min_win_rate:
        reasons.append(
            f"win rate {win_rate:.3f} on {prompts} prompts is at least {win_rate_lower:.3f} with "
            f"{config.win_rate_confidence:.0%} confidence, not above {config.min_win_rate}"
        )
    if candidate_reward - serving_reward <= config.min_reward_gain:
        reasons.append(
            f"mean reward {candidate_reward:+.3f} does not beat serving {serving_reward:+.3f} "
            f"by more than {config.min_reward_gain}"
        )
    if reward_pairs < config.min_reward_pairs:
        reasons.append(
            f"the reward model's accuracy is measured on {reward_pairs} held-out pairs "
            f"(need {config.min_reward_pairs}): an untested judge"
        )
    elif reward_accuracy is not None and reward_accuracy < config.min_reward_accuracy:
        reasons.append(
            f"the reward model's held-out accuracy {reward_accuracy:.3f} on {reward_pairs} pairs is "
            f"below {config.min_reward_accuracy}"
        )
    elif reward_accuracy_lower is not None and reward_accuracy_lower <= 0.5 < config.reward_accuracy_confidence:
        reasons.append(
            f"the reward model's held-out accuracy {reward_accuracy:.3f} on {reward_pairs} pairs is at least "
            f"{reward_accuracy_lower:.3f} with {config.reward_accuracy_confidence:.0%} confidence: "
            "not told apart from a coin"
        )
    if math.isfinite(kl) and kl > config.max_kl:  # a NaN or infinite KL failed above
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
        "win_rate_lower": win_rate_lower,
        "reward_accuracy": reward_accuracy,
        "reward_accuracy_lower": reward_accuracy_lower,
        "reward_pairs": reward_pairs,
        "users_on_serving_answers": users,
        "candidate_reward": candidate_reward,
        "serving_reward": serving_reward,
        "kl": kl,
        "prompts": len(candidate_scores),
        "candidate": asdict(candidate),
        "serving": asdict(serving),
        "config": asdict(config),
    }
    return GateDecision(passed=not reasons, reasons=reasons, metrics=metrics)
