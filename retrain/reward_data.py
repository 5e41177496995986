"""What the reward model learns from: plain data classes, and their shaping into token ids.

The round orchestration adapts the store's batch reader (feedback/training_data.py) to these
classes; benchmarks build them from public data sets. Nothing here touches the database.

- A `ComparisonGroup` is one prompt with every judged pair among its answers, ties ('same'
  verdicts) included. All pairs of a group count as one example (InstructGPT: the C(K,2) pairs
  of a K-way ranking form one batch element), so a prompt with many answers does not dominate
  the loss.
- A `ThumbLabel` is an answer with a +1/-1 thumb: a pointwise example, whether or not the
  answer is also in a pair.
- A prompt is the conversation up to the answer, as chat turns {"role", "content"} (system
  prompt included if the conversation has one); an answer is the assistant text that follows.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import torch

Message = dict[str, str]  # {"role": "system" | "user" | "assistant", "content": str}
Conversation = tuple[Sequence[Message], str]  # (prompt turns, answer text): what gets a score


@dataclass(frozen=True)
class PreferencePair:
    chosen: str  # the better answer's text (a tie: one of the two)
    rejected: str  # the worse answer's text (a tie: the other)
    source: str = ""  # where it came from (e.g. a comparison id), for tracing
    tie: bool = False  # a 'same' verdict: the loss pulls the two scores together
    versions: tuple[str | None, str | None] = (None, None)  # the checkpoints that wrote chosen, rejected


@dataclass(frozen=True)
class ComparisonGroup:
    """Every judged pair among the answers to one prompt."""

    prompt: Sequence[Message]
    pairs: Sequence[PreferencePair]
    source: str = ""  # e.g. the prompt message id

    def __post_init__(self):
        if not self.pairs:
            raise ValueError("a comparison group needs at least one pair")
        for pair in self.pairs:
            if pair.chosen == pair.rejected:
                raise ValueError(f"pair {pair.source or pair.chosen[:40]!r} compares an answer with itself")

    @classmethod
    def from_ranking(cls, prompt: Sequence[Message], answers_best_first: Sequence[str], source: str = "") -> ComparisonGroup:
        """A K-way ranking becomes its C(K,2) pairs, best answer first."""
        pairs = [PreferencePair(better, worse) for better, worse in itertools.combinations(answers_best_first, 2)]
        return cls(prompt, pairs, source)

    def answers(self) -> list[str]:
        """Distinct answer texts in first-seen order: each is scored once per step."""
        return list(dict.fromkeys(text for pair in self.pairs for text in (pair.chosen, pair.rejected)))


@dataclass(frozen=True)
class ThumbLabel:
    """An answer rated on its own: +1 (thumbs up) or -1 (thumbs down)."""

    prompt: Sequence[Message]
    answer: str
    label: int
    source: str = ""
    version: str | None = None  # the checkpoint that wrote the answer

    def __post_init__(self):
        if self.label not in (1, -1):
            raise ValueError(f"a thumb label is +1 or -1, not {self.label!r}")


@dataclass
class RewardData:
    groups: list[ComparisonGroup] = field(default_factory=list)
    thumbs: list[ThumbLabel] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        """Groups, strict pairs, ties and thumbs."""
        ties = sum(pair.tie for group in self.groups for pair in group.pairs)
        return {
            "groups": len(self.groups),
            "pairs": sum(len(group.pairs) for group in self.groups) - ties,
            "ties": ties,
            "thumbs": len(self.thumbs),
        }

    def written_by(self, version: str) -> RewardData:
        """Only the pairs whose two answers, and the thumbs whose answer, `version` wrote: how
        the users judged that policy's own answers."""
        groups = []
        for group in self.groups:
            pairs = [p for p in group.pairs if p.versions == (version, version)]
            if pairs:
                groups.append(ComparisonGroup(group.prompt, pairs, group.source))
        return RewardData(groups, [t for t in self.thumbs if t.version == version])

    def conversations(self) -> list[Conversation]:
        """Every (prompt, answer) in the data, once each."""
        seen: dict[str, Conversation] = {}
        for group in self.groups:
            for answer in group.answers():
                seen.setdefault(_key(group.prompt, answer), (group.prompt, answer))
        for thumb in self.thumbs:
            seen.setdefault(_key(thumb.prompt, thumb.answer), (thumb.prompt, thumb.answer))
        return list(seen.values())


def _key(prompt: Sequence[Message], answer: str | None = None) -> str:
    return json.dumps([list(map(dict, prompt)), answer], ensure_ascii=False, sort_keys=True)


def is_held_out(prompt: Sequence[Message], percent: float) -> bool:
    """A stable split by prompt: the same prompt lands on the same side in every round, so a
    warm-started model is never evaluated on prompts it trained on in an earlier round, and all
    answers to one prompt stay together."""
    digest = hashlib.sha256(_key(prompt).encode()).digest()
    return int.from_bytes(digest[:8], "big") % 10_000 < percent * 100


def split_held_out(data: RewardData, percent: float) -> tuple[RewardData, RewardData]:
    """(train, held out), split by prompt (see `is_held_out`)."""
    train, held = RewardData(), RewardData()
    for group in data.groups:
        (held if is_held_out(group.prompt, percent) else train).groups.append(group)
    for thumb in data.thumbs:
        (held if is_held_out(thumb.prompt, percent) else train).thumbs.append(thumb)
    return train, held


# -- token ids ---------------------------------------------------------------------------------

def encode_conversation(tokenizer, prompt: Sequence[Message], answer: str, max_tokens: int) -> list[int]:
    """Token ids of the prompt + answer as the chat template renders them, ending with the
    answer's end-of-turn token (the score is read there), cut from the left to `max_tokens`.

    Cutting from the left keeps the answer and the turns nearest to it, which is what a judge
    of the answer needs most; the oldest turns (and the system prompt) go first."""
    return encode_answer(tokenizer, prompt, answer, max_tokens)[0]


def encode_answer(tokenizer, prompt: Sequence[Message], answer: str, max_tokens: int) -> tuple[list[int], int]:
    """`encode_conversation`'s ids, and how many of the last ones are the answer's own: its
    text and end-of-turn token, what a mean-pooling judge averages over (at least 1; all of
    them when the answer alone is longer than `max_tokens`)."""
    text = tokenizer.apply_chat_template([*map(dict, prompt), {"role": "assistant", "content": answer}], tokenize=False)
    # Templates end a turn with e.g. "<|im_end|>\n": drop the trailing whitespace so the last
    # token is the end-of-turn marker itself, the same place for every answer.
    ids = tokenizer(text.rstrip(), add_special_tokens=False)["input_ids"]
    opening = tokenizer.apply_chat_template([*map(dict, prompt)], tokenize=False, add_generation_prompt=True)
    prompt_tokens = len(tokenizer(opening, add_special_tokens=False)["input_ids"])
    kept = ids[-max_tokens:]
    return kept, max(1, min(len(ids) - prompt_tokens, len(kept)))


@dataclass(frozen=True)
class EncodedGroup:
    """A comparison group as token ids: each distinct answer once, pairs as indices into them."""

    sequences: list[list[int]]
    pairs: list[tuple[int, int]]  # (chosen index, rejected index) into `sequences`
    ties: list[tuple[int, int]] = field(default_factory=list)  # (index, index) of 'same' verdicts
    answer_tokens: list[int] | None = None  # per sequence, its last tokens that are the answer (None: all)


@dataclass(frozen=True)
class EncodedThumb:
    sequence: list[int]
    label: int
    answer_tokens: int | None = None  # the sequence's last tokens that are the answer (None: all)


def encode_groups(tokenizer, groups: Sequence[ComparisonGroup], max_tokens: int) -> list[EncodedGroup]:
    encoded = []
    for group in groups:
        answers = group.answers()
        index = {text: i for i, text in enumerate(answers)}
        sequences, answer_tokens = zip(*(encode_answer(tokenizer, group.prompt, text, max_tokens) for text in answers))
        encoded.append(EncodedGroup(
            sequences=list(sequences),
            pairs=[(index[pair.chosen], index[pair.rejected]) for pair in group.pairs if not pair.tie],
            ties=[(index[pair.chosen], index[pair.rejected]) for pair in group.pairs if pair.tie],
            answer_tokens=list(answer_tokens),
        ))
    return encoded


def encode_thumbs(tokenizer, thumbs: Sequence[ThumbLabel], max_tokens: int) -> list[EncodedThumb]:
    encoded = []
    for thumb in thumbs:
        ids, answer_tokens = encode_answer(tokenizer, thumb.prompt, thumb.answer, max_tokens)
        encoded.append(EncodedThumb(ids, thumb.label, answer_tokens))
    return encoded


def collate(items: Sequence[EncodedGroup | EncodedThumb], pad_id: int) -> dict:
    """One batch: every sequence of every item, right-padded, plus where each loss term reads
    and which tokens are the answers' own (`answer_mask`, what a mean-pooling judge averages).

    Weights make each item count once in the batch mean: a group's pairs and ties share its
    weight (1/(pairs + ties) each, i.e. 1/C(K,2) for a full K-way ranking) and a thumb has its own."""
    sequences: list[list[int]] = []
    answer_tokens: list[int | None] = []
    chosen, rejected, pair_weight = [], [], []
    tie_a, tie_b, tie_weight = [], [], []
    thumb_index, thumb_label = [], []
    for item in items:
        offset = len(sequences)
        if isinstance(item, EncodedGroup):
            sequences.extend(item.sequences)
            answer_tokens.extend(item.answer_tokens or [None] * len(item.sequences))
            share = 1.0 / (len(item.pairs) + len(item.ties))
            for c, r in item.pairs:
                chosen.append(offset + c)
                rejected.append(offset + r)
                pair_weight.append(share)
            for a, b in item.ties:
                tie_a.append(offset + a)
                tie_b.append(offset + b)
                tie_weight.append(share)
        else:
            sequences.append(item.sequence)
            answer_tokens.append(item.answer_tokens)
            thumb_index.append(offset)
            thumb_label.append(float(item.label))
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    answer_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, (ids, answer) in enumerate(zip(sequences, answer_tokens)):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        answer_mask[row, len(ids) - min(answer or len(ids), len(ids)) : len(ids)] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "answer_mask": answer_mask,
        "pair_chosen": torch.tensor(chosen, dtype=torch.long),
        "pair_rejected": torch.tensor(rejected, dtype=torch.long),
        "pair_weight": torch.tensor(pair_weight, dtype=torch.float32),
        "tie_a": torch.tensor(tie_a, dtype=torch.long),
        "tie_b": torch.tensor(tie_b, dtype=torch.long),
        "tie_weight": torch.tensor(tie_weight, dtype=torch.float32),
        "thumb_index": torch.tensor(thumb_index, dtype=torch.long),
        "thumb_label": torch.tensor(thumb_label, dtype=torch.float32),
        "items": torch.tensor(len(items), dtype=torch.long),
    }


def item_length(item: EncodedGroup | EncodedThumb) -> int:
    """Tokens an item puts through the model: what a length-grouped batch balances."""
    return sum(map(len, item.sequences)) if isinstance(item, EncodedGroup) else len(item.sequence)


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int, epoch: int) -> Iterator[list[int]]:
    """Shuffled batches of similar-length items: shuffle, sort within windows of 16 batches,
    cut, shuffle the batches. Less padding (the CPU's time goes to real tokens) while every
    epoch still sees a fresh order."""
    rng = random.Random(seed * 1_000_003 + epoch)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    window = batch_size * 16
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches.extend(chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size))
    rng.shuffle(batches)
    yield from batches
