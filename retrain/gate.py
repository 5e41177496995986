"""The gate: a candidate is promoted only if, on held-out logged prompts, its reward beats the
serving policy's by more than chance, the reward model judging it is itself accurate enough on
held-out pairs to be trusted, its KL to the reference stays under a bound, and it shows no
degeneration. A number that is not a number (NaN, inf) fails whatever it is.

The judge is the reward model PPO just optimised against, so its win rate alone can be met by
fooling it: hence the floor on its accuracy on the users' held-out verdicts (a share, and a
confidence bound that must clear a coin's 0.5), and the confidence bound on the win rate (5 wins
of 5 prompts is not "1.00", it is "at least 0.69 with 90% confidence"). The held-out verdicts are
the comparisons and, beside them, the thumbs: how often the judge scores an answer the users
liked above one they did not (see `thumb_ranking`). The users' own verdicts on the serving
policy's held-out answers, when there are any, are reported beside: how the judge ranks what the
users judged.

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
        metadata={"help": "Fewest held-out verdicts that accuracy must be measured on: comparison pairs, "
                          "plus with judge_counts_thumbs the thumbs' up/down matchings (fewer: the judge "
                          "is untested and the candidate is rejected)."},
    )
    judge_counts_thumbs: bool = field(
        default=True,
        metadata={"help": "Count the held-out thumbs beside the comparisons in the judge's accuracy: the "
                          "share of (thumbs up, thumbs down) answer pairs it scores in the users' order, "
                          "weighed as min(ups, downs) comparisons. False: comparisons only. On day 1 the "
                          "loop has 13 held-out comparisons, and a judge checked on 13 is a coin toss."},
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
        accuracy = m["judge_accuracy"]
        judged = f"{m['judge_verdicts']} {'verdicts' if m['judge_counts_thumbs'] else 'pairs'}"
        judge = f"{accuracy:.2f} on {judged}" if accuracy is not None else "untested"
        if m.get("judge_accuracy_lower") is not None:
            judge += f", at least {m['judge_accuracy_lower']:.2f}"
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


def thumb_ranking(scores: list[float], liked: list[bool]) -> dict | None:
    """How a judge's scores rank the users' thumbs: the share of (thumbs up, thumbs down) answer
    pairs in which the liked answer scores higher (ties count half), i.e. the area under the ROC
    curve: 0.5 for a judge that knows nothing whatever the share of thumbs up, where the sign
    rule (score > 0 means up) rewards a judge that calls everything what most answers are.

    `weight` = min(ups, downs): the pairs could be split into that many disjoint comparisons,
    and this share is their average over every such split, so it is no noisier than
    `weight` independent comparisons: counting it as that many is conservative. None when
    either side is empty (nothing to rank)."""
    ups = [s for s, like in zip(scores, liked, strict=True) if like]
    downs = [s for s, like in zip(scores, liked, strict=True) if not like]
    if not ups or not downs:
        return None
    ordered = sum(1.0 if u > d else 0.5 if u == d else 0.0 for u in ups for d in downs)
    return {"auc": ordered / (len(ups) * len(downs)), "ups": len(ups), "downs": len(downs),
            "weight": min(len(ups), len(downs))}


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
    thumbs: dict | None = None,
) -> GateDecision:
    """Compare candidate and serving answers to the same held-out prompts, prompt by prompt.

    reward_accuracy / reward_pairs: the judge's accuracy on the held-out side's comparisons and
    how many pairs it was measured on. thumbs: how it ranks the held-out thumbs (`thumb_ranking`),
    counted beside the pairs when config.judge_counts_thumbs. users: how the judge ranks the users'
    own held-out verdicts on the serving policy's answers (recorded, not decided on)."""
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
    # The judge's verdicts: its comparisons, and its thumbs' matchings when they count.
    judged = reward_pairs if reward_accuracy is not None else 0
    judged_right = reward_accuracy * reward_pairs if judged else 0.0
    counted_thumbs = thumbs if config.judge_counts_thumbs and thumbs else None
    if counted_thumbs:
        judged += counted_thumbs["weight"]
        judged_right += counted_thumbs["auc"] * counted_thumbs["weight"]
    judge_accuracy = judged_right / judged if judged else None
    judge_accuracy_lower = (
        win_rate_lower_bound(judged_right, judged, config.reward_accuracy_confidence)
        if judged and math.isfinite(judged_right) else None
    )
    judge = "" if judge_accuracy is None else (
        f"{judge_accuracy:.3f} on {judged} verdicts ({reward_pairs} pairs; thumbs ranked "
        f"{counted_thumbs['auc']:.3f} over {counted_thumbs['ups']} up and {counted_thumbs['downs']} down, "
        f"weighed as {counted_thumbs['weight']})" if counted_thumbs else f"{judge_accuracy:.3f} on {judged} pairs"
    )

    reasons = _not_numbers({
        "a candidate score": candidate_scores, "a serving score": serving_scores, "the KL": [kl],
        "the reward model's accuracy": [] if reward_accuracy is None else [reward_accuracy],
        "the reward model's thumbs ranking": [counted_thumbs["auc"]] if counted_thumbs else [],
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
    if judged < config.min_reward_pairs:
        reasons.append(
            f"the reward model's accuracy is measured on {judged} held-out "
            f"{'verdicts' if counted_thumbs else 'pairs'} "
            f"(need {config.min_reward_pairs}): an untested judge"
        )
    elif judge_accuracy is not None and not math.isfinite(judge_accuracy):
        pass  # failed above
    elif judge_accuracy is not None and judge_accuracy < config.min_reward_accuracy:
        reasons.append(f"the reward model's held-out accuracy {judge} is below {config.min_reward_accuracy}")
    elif judge_accuracy_lower is not None and judge_accuracy_lower <= 0.5 < config.reward_accuracy_confidence:
        reasons.append(
            f"the reward model's held-out accuracy {judge} is at least {judge_accuracy_lower:.3f} with "
            f"{config.reward_accuracy_confidence:.0%} confidence: not told apart from a coin"
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
        "reward_pairs": reward_pairs,
        "thumb_ranking": thumbs,
        "judge_accuracy": judge_accuracy,
        "judge_accuracy_lower": judge_accuracy_lower,
        "judge_verdicts": judged,
        "judge_counts_thumbs": counted_thumbs is not None,
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
