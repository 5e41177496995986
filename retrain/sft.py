"""Supervised fine-tuning on demonstrations: InstructGPT's step 1, from live chat.

A demonstration is an answer a user edited into the one they wanted (feedback/store.py,
record_demonstration). Each round, before PPO, the policy adapter imitates the training side's
demonstrations: next-token cross-entropy on the answer tokens only (the context is read, not
learnt), over a few epochs. PPO then starts from the fine-tuned adapter.

Why this shape:
- The same LoRA adapter PPO trains (ppo.prepare_policy with the round's PPOConfig): a base
  model gets a fresh adapter here and PPO keeps training it; a serving adapter keeps learning.
  The reference policy stays "adapter off", i.e. the base model, so the KL the gate bounds
  and the loop reports is still measured against the base, SFT included.
- The loop is written on torch rather than with TRL's SFTTrainer: SFTTrainer masks the context
  only with `assistant_only_loss`, which needs `{% generation %}` markers that SmolLM2's chat
  template lacks, and it wraps its own Trainer (optimizer, devices, logging) around a model PPO
  must get back as it was. The loss here is the same one SFTTrainer's prompt-completion mode
  computes. (`python -m feedback export --sft` writes the same data for SFTTrainer.)
- Dropout stays off (model.eval()), as in PPO: the adapter has none, and the base's would only
  add noise to the before/after losses.
- Under `accelerate launch` every process trains on every demonstration with the same seed:
  demonstrations are few (each one typed by a person), and identical updates keep the
  processes' adapters equal without a gradient all-reduce.

The answer tokens are what the chat template renders after the generation prompt, up to and
including the end-of-turn token, so the policy learns to stop where the person stopped.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from feedback.training_data import Demonstration

from .ppo import PPOConfig, prepare_policy

log = logging.getLogger(__name__)

IGNORE = -100  # label of a token that is not learnt (context, padding)


@dataclass
class SFTConfig:
    enabled: bool = field(
        default=True,
        metadata={"help": "Fine-tune the policy on the training side's demonstrations before PPO "
                          "each round (when there are any)."},
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
        metadata={"help": "Most demonstrations one round trains on (the newest; None: all). Bounds "
                          "the round's time as demonstrations pile up."},
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


@dataclass
class SFTResult:
    model: nn.Module  # the policy with its adapter fine-tuned (a PeftModel with LoRA)
    stats: dict = field(default_factory=dict)  # see train_sft


def tokenize_demonstration(tokenizer, prompt: Sequence[dict], answer: str) -> tuple[list[int], list[int]]:
    """(input ids, labels): the chat template's rendering of context + answer, labels IGNORE on
    the context (everything up to the generation prompt) and on whitespace after the turn's end."""
    prompt_text = tokenizer.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
    full_text = tokenizer.apply_chat_template(
        [*prompt, {"role": "assistant", "content": answer}], tokenize=False
    )
    if not full_text.startswith(prompt_text):
        raise ValueError("the chat template renders the answer's context differently from the prompt PPO samples on")
    prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
    answer_ids = tokenizer(full_text[len(prompt_text):].rstrip(), add_special_tokens=False)["input_ids"]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def _batch(examples: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> dict[str, torch.Tensor]:
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
        nll, n = answer_nll(model, _batch(examples[start : start + batch_size], pad_id, device))
        total, tokens = total + float(nll), tokens + n
    return total / max(tokens, 1)


def train_sft(
    model: nn.Module,
    tokenizer,
    demonstrations: Sequence[Demonstration],
    config: SFTConfig,
    ppo: PPOConfig,
) -> SFTResult:
    """Fine-tune `model`'s adapter (created with `ppo`'s LoRA settings when it has none) on the
    demonstrations. Returns the model and stats: demonstrations (given), used, too_long,
    answer_tokens, steps, epochs, loss_before / loss_after (mean NLL per answer token, nats, on
    the demonstrations used), seconds."""
    started = time.perf_counter()
    if config.max_demonstrations is not None and len(demonstrations) > config.max_demonstrations:
        demonstrations = sorted(demonstrations, key=lambda d: d.created_at)[-config.max_demonstrations :]
    examples, too_long = [], 0
    for demo in demonstrations:
        ids, labels = tokenize_demonstration(tokenizer, demo.prompt, demo.answer.content)
        if len(ids) > config.max_tokens:
            too_long += 1
            continue
        examples.append((ids, labels))
    stats = {"demonstrations": len(demonstrations), "used": len(examples), "too_long": too_long,
             "answer_tokens": sum(sum(1 for x in lab if x != IGNORE) for _, lab in examples)}
    if not examples:
        log.warning("SFT: none of %d demonstrations fits %d tokens; skipped", len(demonstrations), config.max_tokens)
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
            nll, n = answer_nll(policy, _batch(shuffled[start : start + config.batch_size], pad_id, device))
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
    log.info("SFT on %d demonstrations: answer loss %.3f -> %.3f nats/token in %.1f s",
             len(examples), stats["loss_before"], stats["loss_after"], stats["seconds"])
    return SFTResult(policy, stats)


def sft_before_ppo(run, policy: nn.Module, tokenizer, demonstrations: Sequence[Demonstration], config) -> nn.Module:
    """The round's SFT stage (retrain/round.py calls it right before PPO): fine-tune on the
    training side's demonstrations when there are any and SFT is enabled; records
    counts["sft_demonstrations"], metrics["sft"] and timings["sft"] on the run. Returns the
    policy PPO starts from."""
    run.counts["sft_demonstrations"] = len(demonstrations)
    run.timings.setdefault("sft", 0.0)  # every stage is in the breakdown, 0 when skipped
    if not config.sft.enabled or not demonstrations:
        run.metrics["sft"] = {"ran": False, "demonstrations": len(demonstrations),
                              "reason": "disabled" if not config.sft.enabled else "no demonstrations on the training side"}
        return policy
    result = train_sft(policy, tokenizer, demonstrations, config.sft, config.ppo)
    run.metrics["sft"] = {"ran": result.stats["steps"] > 0, **result.stats}
    run.timings["sft"] += result.stats["seconds"]
    return result.model
