"""A round's data: the store's batch reads adapted to what the reward model and PPO consume.

One split decides everything: a prompt (the conversation up to a user turn) is held out when a
hash of its text says so (`reward_data.is_held_out`), the same in every round. Held-out prompts
are the gate's; their comparisons and thumbs measure the reward model's accuracy; they never
reach PPO or the reward model's training. Splitting by text rather than by message id keeps a
prompt typed twice (two users saying "hi") on one side.

What the adapter adds to the store's reads (feedback/training_data.py already honours
allow_data_use, drops same-text pairs, and removes duplicates within each reader):
- one comparison group per prompt text: a prompt's comparisons and its opposite-thumb pairs
  form one group (InstructGPT: all pairs of one prompt are one example), and the same prompt
  from two conversations is one group, its pairs kept once;
- 'same' verdicts as ties of their group, every thumb as a pointwise label (compared or not),
  and on every answer the checkpoint that wrote it (the gate asks how the reward model ranks
  the serving policy's own answers);
- a `source` on every example naming the rows it came from (`comparison:12`, `ratings:3,4`,
  `prompt:<message id>`), and the message ids of every prompt, so each number is traceable;
- counts of everything read, kept and set aside;
- the demonstrations (answers users edited into the ones they wanted) and the thumbed answers
  (a policy's answers with net thumbs up or down, finished or cut at the token limit) on
  training-side prompts, for the round's SFT (retrain/sft.py) and KTO (retrain/kto.py) stages;
  those on held-out prompts are never trained on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from collections.abc import Iterable
from contextlib import closing
from dataclasses import dataclass, field

import psycopg

from feedback import training_data
from feedback.training_data import Demonstration, LoggedPrompt, RatedAnswer

from .reward_data import ComparisonGroup, PreferencePair, RewardData, ThumbLabel, is_held_out

log = logging.getLogger(__name__)


@dataclass
class RoundData:
    reward_train: RewardData  # comparison groups and thumbs on training-side prompts
    reward_held_out: RewardData  # the same from held-out prompts: the reward model's accuracy
    ppo_prompts: list[LoggedPrompt]  # a fresh sample of the training-side prompts, at most max_ppo_prompts
    gate_prompts: list[LoggedPrompt]  # held-out prompts, at most max_gate_prompts
    counts: dict[str, int] = field(default_factory=dict)
    demonstrations: list[Demonstration] = field(default_factory=list)  # training-side prompts only
    thumbed: list[RatedAnswer] = field(default_factory=list)  # a policy's thumbed answers, training side

    @property
    def liked(self) -> list[RatedAnswer]:
        return [r for r in self.thumbed if r.label > 0]

    def fingerprint(self) -> str:
        """sha256 over the ids of every row used: two rounds trained on the same rows agree."""
        sources = sorted(
            [p.source for g in self.reward_train.groups for p in g.pairs]
            + [t.source for t in self.reward_train.thumbs]
            + [f"prompt:{p.message_id}" for p in self.ppo_prompts]
            + [f"gate:{p.message_id}" for p in self.gate_prompts]
            + [f"demonstration:{d.answer.id}" for d in self.demonstrations]
            + [f"thumbed:{r.answer.id}" for r in self.thumbed]
        )
        return hashlib.sha256("\n".join(sources).encode()).hexdigest()

    def trace(self) -> dict:
        """The ids a checkpoint's manifest keeps: which prompts trained it and which judged it."""
        return {
            "fingerprint": self.fingerprint(),
            "ppo_prompt_ids": [str(p.message_id) for p in self.ppo_prompts],
            "gate_prompt_ids": [str(p.message_id) for p in self.gate_prompts],
            "demonstration_ids": [str(d.answer.id) for d in self.demonstrations],
            "liked_answer_ids": [str(r.answer.id) for r in self.liked],
            "disliked_answer_ids": [str(r.answer.id) for r in self.thumbed if r.label < 0],
        }


def prompt_key(turns: Iterable[dict]) -> str:
    """Identity of a prompt: its turns' roles and texts (ids differ between conversations)."""
    return json.dumps([[t["role"], t["content"]] for t in turns], ensure_ascii=False)


class _GroupBuilder:
    """Pairs gathered per prompt text, each (chosen text, rejected text) once."""

    def __init__(self):
        self.prompts: dict[str, list[dict]] = {}
        self.sources: dict[str, list[str]] = {}
        self.pairs: dict[str, dict[tuple[str, str, bool], PreferencePair]] = {}
        self.duplicates = 0

    def add(self, prompt: list[dict], prompt_id, chosen: training_data.Answer, rejected: training_data.Answer,
            source: str, tie: bool = False) -> None:
        key = prompt_key(prompt)
        self.prompts.setdefault(key, [dict(t) for t in prompt])
        sources = self.sources.setdefault(key, [])
        if f"prompt:{prompt_id}" not in sources:
            sources.append(f"prompt:{prompt_id}")
        pairs = self.pairs.setdefault(key, {})
        texts = (chosen.content, rejected.content, tie)
        if texts in pairs:
            self.duplicates += 1
            return
        pairs[texts] = PreferencePair(chosen.content, rejected.content, source, tie,
                                      (chosen.model_version, rejected.model_version))

    def groups(self) -> list[ComparisonGroup]:
        return [
            ComparisonGroup(self.prompts[key], list(pairs.values()), ",".join(self.sources[key]))
            for key, pairs in self.pairs.items()
        ]


def read_reward_data(conn: psycopg.Connection) -> tuple[RewardData, dict[str, int]]:
    """Every comparison group (ties included), thumb pair and thumb the store allows training on."""
    builder = _GroupBuilder()
    counts = {"comparison_groups": 0, "comparison_pairs": 0, "comparison_ties": 0, "thumb_pairs": 0, "thumbs": 0}
    for group in training_data.comparison_groups(conn):
        counts["comparison_groups"] += 1
        for chosen, rejected, preference in group.pairs():
            counts["comparison_pairs"] += 1
            builder.add(group.prompt, group.prompt_id, chosen, rejected, f"comparison:{preference.comparison_id}")
        for answer, other, preference in group.ties():
            counts["comparison_ties"] += 1
            builder.add(group.prompt, group.prompt_id, answer, other, f"comparison:{preference.comparison_id}", tie=True)
    for pair in training_data.thumb_pairs(conn):
        counts["thumb_pairs"] += 1
        builder.add(pair.prompt, pair.prompt_id, pair.chosen, pair.rejected,
                    "ratings:" + ",".join(map(str, pair.rating_ids)))
    thumbs = []
    for rated in training_data.thumbs(conn):
        counts["thumbs"] += 1
        thumbs.append(ThumbLabel([dict(t) for t in rated.prompt], rated.answer.content, rated.label,
                                 "ratings:" + ",".join(map(str, rated.rating_ids)), rated.answer.model_version))
    counts["duplicate_pairs_merged"] = builder.duplicates
    return RewardData(builder.groups(), thumbs), counts


def read_prompts(
    conn: psycopg.Connection, held_out_percent: float, max_ppo_prompts: int, max_gate_prompts: int, seed: int = 0
) -> tuple[list[LoggedPrompt], list[LoggedPrompt], dict[str, int]]:
    """(PPO prompts, gate prompts), each side capped.

    PPO's are a uniform sample of *all* training-side prompts, drawn afresh with each round's
    seed (reservoir sampling over the stream, so only the sample is held): a fixed prefix of
    the hash order would train every round on the same prompts. The gate's are the first of
    the held-out side in the store's hash order: the same judges round after round."""
    ppo: list[tuple[int, LoggedPrompt]] = []
    gate: list[LoggedPrompt] = []
    rng = random.Random(seed)
    seen_training = 0
    counts = {"prompts_read": 0}
    with closing(training_data.prompts(conn)) as stream:  # closing: ends the cursor's transaction
        for prompt in stream:
            counts["prompts_read"] += 1
            if is_held_out(prompt.messages, held_out_percent):
                if len(gate) < max_gate_prompts:
                    gate.append(prompt)
                continue
            # Algorithm R: the n-th training prompt replaces a kept one with probability cap/n.
            seen_training += 1
            if len(ppo) < max_ppo_prompts:
                ppo.append((seen_training, prompt))
            elif (slot := rng.randrange(seen_training)) < max_ppo_prompts:
                ppo[slot] = (seen_training, prompt)
    counts["training_prompts"] = seen_training
    return [prompt for _, prompt in sorted(ppo, key=lambda kept: kept[0])], gate, counts


def split(data: RewardData, held_out_percent: float) -> tuple[RewardData, RewardData]:
    """(training side, held-out side) by the prompt split every part of the round shares."""
    train, held = RewardData(), RewardData()
    for group in data.groups:
        (held if is_held_out(group.prompt, held_out_percent) else train).groups.append(group)
    for thumb in data.thumbs:
        (held if is_held_out(thumb.prompt, held_out_percent) else train).thumbs.append(thumb)
    return train, held


def within_budget(data: RewardData, max_examples: int | None, seed: int) -> tuple[RewardData, int]:
    """At most `max_examples` comparison groups and thumbs, a uniform sample: reward training
    time grows with the data, a round's must not. Each round passes its own seed, so over
    rounds the warm-started model still sees all of it. Returns (sample, examples left out)."""
    items = [*data.groups, *data.thumbs]
    if max_examples is None or len(items) <= max_examples:
        return data, 0
    keep = set(random.Random(seed).sample(range(len(items)), max_examples))
    chosen = [item for i, item in enumerate(items) if i in keep]
    sample = RewardData([x for x in chosen if isinstance(x, ComparisonGroup)], [x for x in chosen if isinstance(x, ThumbLabel)])
    return sample, len(items) - max_examples


def read_demonstrations(conn: psycopg.Connection, held_out_percent: float) -> tuple[list[Demonstration], dict[str, int]]:
    """The store's demonstrations on training-side prompts; held-out ones are only counted."""
    train, held_out = [], 0
    for demo in training_data.demonstrations(conn):
        if is_held_out(demo.prompt, held_out_percent):
            held_out += 1
        else:
            train.append(demo)
    return train, {"demonstrations": len(train), "held_out_demonstrations": held_out}


LEARNABLE_ENDS = ("stop", "length")  # a turn that ended, or was cut at the token limit


def read_thumbed_answers(conn: psycopg.Connection, held_out_percent: float) -> tuple[list[RatedAnswer], dict[str, int]]:
    """The thumbed answers a policy wrote (net thumbs up or down) on training-side prompts, for
    SFT's liked answers and KTO; held-out ones are only counted. An answer that was cancelled,
    failed, or whose end is not on record is left out: what the user saw may not be what the
    policy would have said. A person's text (a demonstration) is not a policy's answer."""
    train, held_out, left_out = [], 0, 0
    for rated in training_data.thumbs(conn):
        if rated.answer.model_version is None:
            continue
        if rated.finish_reason not in LEARNABLE_ENDS:
            left_out += 1
        elif is_held_out(rated.prompt, held_out_percent):
            held_out += 1
        else:
            train.append(rated)
    liked = sum(r.label > 0 for r in train)
    return train, {"liked_answers": liked, "disliked_answers": len(train) - liked,
                   "held_out_thumbed_answers": held_out, "thumbed_answers_left_out": left_out}


def read_round_data(
    url: str, *, held_out_percent: float, max_ppo_prompts: int, max_gate_prompts: int,
    max_reward_examples: int | None = None, seed: int = 0,
) -> RoundData:
    with psycopg.connect(url) as conn:
        everything, counts = read_reward_data(conn)
        ppo, gate, prompt_counts = read_prompts(conn, held_out_percent, max_ppo_prompts, max_gate_prompts, seed)
        demonstrations, demonstration_counts = read_demonstrations(conn, held_out_percent)
        thumbed, thumbed_counts = read_thumbed_answers(conn, held_out_percent)
    train, held = split(everything, held_out_percent)
    train, counts["reward_examples_over_budget"] = within_budget(train, max_reward_examples, seed)
    counts |= prompt_counts | demonstration_counts | thumbed_counts
    counts |= {
        "reward_groups": len(train.groups),
        "reward_pairs": train.counts()["pairs"],
        "reward_ties": train.counts()["ties"],
        "reward_thumbs": len(train.thumbs),
        "held_out_groups": len(held.groups),
        "held_out_pairs": held.counts()["pairs"],
        "held_out_ties": held.counts()["ties"],
        "held_out_thumbs": len(held.thumbs),
        "ppo_prompts": len(ppo),
        "gate_prompts": len(gate),
    }
    log.info("round data: %s", counts)
    return RoundData(train, held, ppo, gate, counts, demonstrations, thumbed)


def too_little(data: RoundData, min_pairs: int, min_prompts: int, min_gate_prompts: int) -> str | None:
    """Why this data cannot make a round, or None when it can."""
    c = data.counts
    missing = []
    if c["reward_pairs"] < min_pairs:
        missing.append(f"{c['reward_pairs']} preference pairs (need {min_pairs})")
    if c["ppo_prompts"] < min_prompts:
        missing.append(f"{c['ppo_prompts']} training prompts (need {min_prompts})")
    if c["gate_prompts"] < min_gate_prompts:
        missing.append(f"{c['gate_prompts']} held-out prompts (need {min_gate_prompts})")
    return "too little data: " + ", ".join(missing) if missing else None
