"""Supervised fine-tuning on demonstrations: InstructGPT's step 1, from live chat.

A demonstration is an answer a user edited into the one they wanted (feedback/store.py,
record_demonstration). With `sft.liked_answers` (off by default), the answers the users gave
a thumbs up are learnt too: the policy's own answers, filtered by the people's verdict
(rejection-sampling fine-tuning: RAFT, Dong et al. 2023; ReST-EM, Singh et al. 2023). They
need no judge: a thumb is the users' word, where PPO climbs a reward model that is right on
about 7 pairs in 10. But the answers are samples (temperature 0.8), and learning them word for
word costs KL: on SmolLM2 one round moved the thumbs-up rate by 0.05 at 17.5 nats (KTO on the
same thumbs, retrain/kto.py, did far better). Each round, before PPO, the policy adapter
imitates the training side's examples: next-token cross-entropy on the answer tokens only (the
context is read, not learnt), over a few epochs. PPO then starts from the fine-tuned adapter.

Why this shape:
- The same LoRA adapter PPO trains (ppo.prepare_policy with the round's PPOConfig): a base
  model gets a fresh adapter here and PPO keeps training it; a serving adapter keeps learning.
  The reference policy stays "adapter off", i.e. the base model, so the KL the gate bounds
  and the loop reports is still measured against the base, SFT included.
- The loop is written on torch rather than with TRL's SFTTrainer: SFTTrainer masks the context
  only with `assistant_only_loss`, which needs `{% generation %}` markers that SmolLM2's chat
  template lacks, and it wraps its own Trainer (optimizer, devices, logging) around a model PPO
  must get back as it was. The loss here is the same one SFTTrainer's prompt-completion mode
  computes. (`python -m feedback export --sft` writes the demonstrations for SFTTrainer.)
- Dropout stays off (model.eval()), as in PPO: the adapter has none, and the base's would only
  add noise to the before/after losses.
- Under `accelerate launch` every process trains on every demonstration with the same seed:
  demonstrations are few (each one typed by a person), and identical updates keep the
  processes' adapters equal without a gradient all-reduce.

The answer tokens are what the chat template renders after the generation prompt, up to and
including the end-of-turn token, so the policy learns to stop where the person stopped. A liked
answer that was cut at the token limit (finish_reason "length") is learnt without its end of
turn: the users liked its text, not a stop in mid-sentence.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

import torch
import torch.nn.functional as F
from torch import nn

from feedback.training_data import Demonstration, RatedAnswer

from .ppo import PPOConfig, prepare_policy

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token that is not learnt (context, padding)


@dataclass
class SFTConfig:
    enabled: bool = field(
        default=True,
        metadata={"help": "Fine-tune the policy on the training side's demonstrations (and liked "
                          "answers, see liked_answers) before PPO each round (when there are any)."},
    )
    liked_answers: bool = field(
        default=False,
        metadata={"help": "Also learn the training side's answers that users gave a thumbs up (answers a "
                          "policy wrote; one cut at the token limit is learnt without its end of turn). "
                          "Off: on SmolLM2 one round of it (48 liked answers of 154, 3 epochs) moved the "
                          "held-out thumbs-up rate 0.375 -> 0.425 at a KL of 17.5 nats to the base, most of "
                          "the gate's bound (bench/results/sft-probe-simple-liked.json)."},
    )
    epochs: int = field(default=3, metadata={"help": "Passes over the round's demonstrations."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the adapter during SFT."})
    batch_size: int = field(default=4, metadata={"help": "Demonstrations per optimiser step."})
    max_tokens: int = field(
        default=512,
        metadata={"help": "Longest context + answer in tokens; longer demonstrations are left out "
                          "(counted as too long)."},
    )
    max_demonstrations: int | None = field(
        default=256,
        metadata={"help": "Most examples one round trains on: the newest demonstrations first, then the "
                          "newest liked answers (None: all). Bounds the round's time as they pile up."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle."})

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 1 or self.max_tokens < 2:
            raise ValueError("sft: epochs and batch_size must be >= 1 and max_tokens >= 2")
        if not self.learning_rate > 0:
            raise ValueError(f"sft.learning_rate must be > 0, not {self.learning_rate}")
        if self.max_demonstrations is not None and self.max_demonstrations < 1:
            raise ValueError("sft.max_demonstrations must be >= 1 or None")


@dataclass(frozen=True)
class SFTExample:
    """One answer the policy should learn to give to its context."""

    prompt: list[dict]  # the turns up to the user's, as the chat template takes them
    answer: str
    ended: bool  # False: cut at the token limit; its text is learnt, not a stop there
    created_at: datetime | None
    source: str  # "demonstration:<message id>" (a person wrote it), "liked:<id>" or "disliked:<id>"

    @property
    def written_by_a_person(self) -> bool:
        return self.source.startswith("demonstration:")

    @classmethod
    def of_demonstration(cls, demo: Demonstration) -> SFTExample:
        return cls([dict(t) for t in demo.prompt], demo.answer.content, True, demo.created_at,
                   f"demonstration:{demo.answer.id}")

    @classmethod
    def of_rated(cls, rated: RatedAnswer) -> SFTExample:
        """A thumbed answer a policy wrote ("liked:<id>" or "disliked:<id>")."""
        return cls([dict(t) for t in rated.prompt], rated.answer.content, rated.finish_reason == "stop",
                   rated.created_at, f"{'liked' if rated.label > 0 else 'disliked'}:{rated.answer.id}")


def newest_first(examples: Sequence[SFTExample], most: int | None) -> list[SFTExample]:
    """At most `most` examples: demonstrations before liked answers (a person wrote them), the
    newest of each first."""
    if most is None or len(examples) <= most:
        return list(examples)
    when = lambda e: e.created_at.timestamp() if e.created_at else float("-inf")  # noqa: E731
    ranked = sorted(examples, key=lambda e: (e.written_by_a_person, when(e)), reverse=True)
    return ranked[:most]


@dataclass
class SFTResult:
    model: nn.Module  # the policy with its adapter fine-tuned (a PeftModel with LoRA)
    stats: dict = field(default_factory=dict)  # see train_sft


def tokenize_demonstration(tokenizer, prompt: Sequence[dict], answer: str, ended: bool = True) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat template's rendering of context + answer, labels IGNORE on
    the context (everything up to the generation prompt) and on whitespace after the turn's end.
    ended=False (an answer cut at the token limit): without the special tokens that end the turn."""
    prompt_text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the answer's context differently from the prompt PPO samples on")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):].rstrip(), add_special_tokens=False)["input_ids"]
    if not ended:
        special = set(tokenizer.all_special_ids)
        while answer_ids and answer_ids[-1] in special:
            answer_ids = answer_ids[:-1]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def padded_batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
    """(input ids, labels) examples right-padded into one batch: input_ids, attention_mask, labels."""
    width = max(len(ids) for ids, _ in examples)
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, (ids, lab) in enumerate(examples):
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, : len(lab)] = torch.tensor(lab)
        mask[row, : len(ids)] = 1
    return {"input_ids": input_ids.to(device), "attention_mask": mask.to(device), "labels": labels.to(device)}


def answer_nll(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """(summed next-token NLL over the answer tokens in nats, number of answer tokens)."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["labels"][:, 1:]
    nll = F.cross_entropy(logits.transpose(1, 2), targets, ignore_index=IGNORE, reduction="sum")
    return nll, int((targets != IGNORE).sum())


@torch.no_grad()
def mean_answer_loss(model: nn.Module, examples, batch_size: int, pad_id: int, device) -> float:
    """Mean NLL per answer token (nats) over `examples`: the number SFT lowers."""
    total, tokens = 0.0, 0
    for start in range(0, len(examples), batch_size):
        nll, n = answer_nll(model, padded_batch(examples[start : start + batch_size], pad_id, device))
        total, tokens = total + float(nll), tokens + n
    return total / max(tokens, 1)


def train_sft(
    model: nn.Module,
    tokenizer,
    examples_given: Sequence[SFTExample],
    config: SFTConfig,
    ppo: PPOConfig,
) -> SFTResult:
    """Fine-tune `model`'s adapter (created with `ppo`'s LoRA settings when it has none) on the
    examples. Returns the model and stats: demonstrations and liked (given), over_budget, used,
    too_long, cut (liked answers learnt without their end), answer_tokens, steps, epochs,
    loss_before / loss_after (mean NLL per answer token, nats, on the examples used), seconds."""
    started = time.perf_counter()
    chosen = newest_first(examples_given, config.max_demonstrations)
    examples, too_long = [], 0
    for example in chosen:
        ids, labels = tokenize_demonstration(tokenizer, example.prompt, example.answer, example.ended)
        if len(ids) > config.max_tokens:
            too_long += 1
            continue
        examples.append((ids, labels))
    people = sum(e.written_by_a_person for e in examples_given)
    stats = {"demonstrations": people, "liked": len(examples_given) - people,
             "over_budget": len(examples_given) - len(chosen), "used": len(examples), "too_long": too_long,
             "cut": sum(not e.ended for e in chosen),
             "answer_tokens": sum(sum(1 for x in lab if x != IGNORE) for _, lab in examples)}
    if not examples:
        log.warning("SFT: none of %d examples fits %d tokens; skipped", len(chosen), config.max_tokens)
        return SFTResult(model, {**stats, "steps": 0, "seconds": time.perf_counter() - started})

    policy, _ = prepare_policy(model, ppo)  # the LoRA adapter PPO trains next (dropout off)
    device = next(policy.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    order = random.Random(config.seed)
    stats["loss_before"] = mean_answer_loss(policy, examples, config.batch_size, pad_id, device)
    steps = 0
    for epoch in range(config.epochs):
        shuffled = order.sample(examples, len(examples))
        for start in range(0, len(shuffled), config.batch_size):
            nll, n = answer_nll(policy, padded_batch(shuffled[start : start + config.batch_size], pad_id, device))
            loss = nll / max(n, 1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            steps += 1
        log.info("SFT epoch %d/%d: last batch loss %.3f", epoch + 1, config.epochs, loss.item())
    optimizer.zero_grad(set_to_none=True)
    stats["loss_after"] = mean_answer_loss(policy, examples, config.batch_size, pad_id, device)
    stats.update(steps=steps, epochs=config.epochs, seconds=time.perf_counter() - started)
    if not all(math.isfinite(stats[k]) for k in ("loss_before", "loss_after")):
        raise FloatingPointError(f"SFT loss is not finite: {stats}")
    log.info("SFT on %d examples (%d demonstrations, %d liked answers given): answer loss %.3f -> %.3f "
             "nats/token in %.1f s", len(examples), stats["demonstrations"], stats["liked"],
             stats["loss_before"], stats["loss_after"], stats["seconds"])
    return SFTResult(policy, stats)


def sft_before_ppo(run, policy: nn.Module, tokenizer, demonstrations: Sequence[Demonstration],
                   liked: Sequence[RatedAnswer], config) -> nn.Module:
    """The round's SFT stage (retrain/round.py calls it right before PPO): fine-tune on the
    training side's demonstrations, and its liked answers when `sft.liked_answers`, when there
    are any and SFT is enabled; records counts["sft_demonstrations"] and ["sft_liked"],
    metrics["sft"] and timings["sft"] on the run. Returns the policy PPO starts from."""
    examples = [SFTExample.of_demonstration(d) for d in demonstrations]
    if config.sft.liked_answers:
        examples += [SFTExample.of_rated(r) for r in liked]
    run.counts["sft_demonstrations"] = len(demonstrations)
    run.counts["sft_liked"] = len(examples) - len(demonstrations)
    run.timings.setdefault("sft", 0.0)  # every stage is in the breakdown, 0 when skipped
    if not config.sft.enabled or not examples:
        run.metrics["sft"] = {"ran": False, "demonstrations": len(demonstrations), "liked": len(examples) - len(demonstrations),
                              "reason": "disabled" if not config.sft.enabled else
                              "no demonstrations or liked answers on the training side" if config.sft.liked_answers else
                              f"no demonstrations on the training side ({len(liked)} liked answers: sft.liked_answers is off)"}
        return policy
    result = train_sft(policy, tokenizer, examples, config.sft, config.ppo)
    run.metrics["sft"] = {"ran": result.stats["steps"] > 0, **result.stats}
    run.timings["sft"] += result.stats["seconds"]
    return result.model
