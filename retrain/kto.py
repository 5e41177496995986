"""KTO on the users' thumbs: the votes applied to the policy directly, no judge between them.

KTO (Ethayarajh et al. 2024, "Model Alignment as Prospect Theoretic Optimization") learns from
answers labelled desirable or undesirable, which is what a thumb is. For each thumbed answer the
policy's log-ratio to the reference, r = log pi(answer) - log pi_ref(answer) (summed over the
answer's tokens), is pushed up when the users liked it and down when they did not, through a
sigmoid that saturates: loss = w (1 - sigmoid(beta (r - z))) for a thumb up and
w (1 - sigmoid(beta (z - r))) for a thumb down. z, the reference point, is the batch's mean
log-ratio, detached and at least 0: the cheap form of the paper's KL estimate (TRL's KTOTrainer
measures it on mismatched prompt-answer pairs, one more forward pass per answer). The two sides
are weighed so each counts as much in total (the paper's advice for unbalanced labels).

Why here, beside PPO: PPO climbs a reward model that is right on about 7 held-out pairs in 10,
and a round buys a few points of thumbs up with it. The thumbs themselves are the users' word.
On SmolLM2 one day of the loop's thumbs (154 sampled answers, 48 liked) learnt this way for one
epoch took the held-out thumbs-up rate of `simple` from 0.375 to 0.675 at a KL of 12.6 nats to
the base; three epochs to 0.90 at 28.9 (README, Results: "KTO on the thumbs"). Learning the
liked answers alone (sft.py's `liked_answers`) moved it to 0.425 at 17.5 nats.

The shape follows retrain/sft.py, which runs just before it: the same LoRA adapter PPO trains
(a base model gets a fresh one), reference = adapter off (the base, as for PPO's penalty and the
gate's KL), dropout off, every process the same examples with the same seed. An answer cut at
the token limit is learnt without its end of turn. Off by default until the loop has measured
it (`kto.enabled`).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from feedback.training_data import RatedAnswer

from .ppo import PPOConfig, prepare_policy
from .sft import IGNORE, SFTExample, SFTResult, newest_first, padded_batch, tokenize_demonstration

log = logging.getLogger(__name__)


@dataclass
class KTOConfig:
    enabled: bool = field(
        default=False,
        metadata={"help": "Before PPO each round, learn the training side's thumbed answers (a policy's, "
                          "ended or cut at the token limit) with KTO: liked ones up, disliked ones down, "
                          "relative to the base. Off until the loop has measured it."},
    )
    beta: float = field(default=0.1, metadata={"help": "KTO's beta: how far the log-ratio may go before the loss saturates."})
    epochs: int = field(default=1, metadata={"help": "Passes over the round's thumbed answers."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the adapter during KTO."})
    batch_size: int = field(default=4, metadata={"help": "Answers per optimiser step (at least 2: z is the batch's mean)."})
    max_tokens: int = field(default=512, metadata={"help": "Longest context + answer in tokens; longer ones are left out."})
    max_examples: int | None = field(
        default=512,
        metadata={"help": "Most thumbed answers one round learns (the newest; None: all). Bounds the round's time."},
    )
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=0, metadata={"help": "Seed of the shuffle."})

    def __post_init__(self):
        if self.epochs < 1 or self.batch_size < 2 or self.max_tokens < 2:
            raise ValueError("kto: epochs must be >= 1, batch_size >= 2 and max_tokens >= 2")
        if not self.beta > 0 or not self.learning_rate > 0:
            raise ValueError(f"kto.beta and kto.learning_rate must be > 0, not {self.beta} and {self.learning_rate}")
        if self.max_examples is not None and self.max_examples < 1:
            raise ValueError("kto.max_examples must be >= 1 or None")


def kto_loss(ratio: torch.Tensor, liked: torch.Tensor, beta: float, weights: torch.Tensor) -> tuple[torch.Tensor, float]:
    """(mean weighted KTO loss, z) for log-ratios [B] and their thumbs [B] (True: liked)."""
    z = ratio.mean().detach().clamp(min=0)
    value = torch.where(liked, torch.sigmoid(beta * (ratio - z)), torch.sigmoid(beta * (z - ratio)))
    return (weights * (1 - value)).mean(), float(z)


def answer_logps(model: nn.Module, rows: Sequence[tuple[list[int], list[int]]], pad_id: int, device) -> torch.Tensor:
    """Summed log-probability of each row's answer tokens (labels not IGNORE), [B]."""
    batch = padded_batch(rows, pad_id, device)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    targets = batch["labels"][:, 1:]
    chosen = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (chosen * (targets != IGNORE)).sum(1)


def train_kto(
    model: nn.Module,
    tokenizer,
    labelled: Sequence[tuple[SFTExample, bool]],
    config: KTOConfig,
    ppo: PPOConfig,
) -> SFTResult:
    """KTO on (answer, liked) pairs with `model`'s adapter (created with `ppo`'s LoRA settings
    when it has none); the reference is the adapter off. Returns the model and stats: given,
    over_budget, used, too_long, liked, cut, steps, epochs, loss_first / loss_last, mean log-ratio
    of the liked and disliked answers after (nats), seconds."""
    started = time.perf_counter()
    by_example = {id(example): liked for example, liked in labelled}
    chosen = newest_first([example for example, _ in labelled], config.max_examples)
    rows, too_long = [], 0
    for example in chosen:
        tokens = tokenize_demonstration(tokenizer, example.prompt, example.answer, example.ended)
        if len(tokens[0]) > config.max_tokens:
            too_long += 1
            continue
        rows.append((tokens, by_example[id(example)]))
    ups = sum(liked for _, liked in rows)
    stats = {"given": len(labelled), "over_budget": len(labelled) - len(chosen), "used": len(rows),
             "too_long": too_long, "liked": ups, "cut": sum(not e.ended for e in chosen)}
    if not rows or ups == 0 or ups == len(rows):
        log.warning("KTO: %d answers, %d liked: it needs both kinds; skipped", len(rows), ups)
        return SFTResult(model, {**stats, "steps": 0, "seconds": time.perf_counter() - started})

    policy, _ = prepare_policy(model, ppo)  # the LoRA adapter PPO trains next (dropout off)
    device = next(policy.parameters()).device
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    # Each side weighs as much in total, however few thumbs up a day brings.
    weight = {True: 1.0, False: ups / (len(rows) - ups)}

    def reference_logps() -> list[float]:
        with torch.no_grad(), policy.disable_adapter():
            return [float(v) for start in range(0, len(rows), config.batch_size)
                    for v in answer_logps(policy, [t for t, _ in rows[start : start + config.batch_size]], pad_id, device)]

    reference = reference_logps()
    params = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate)
    order, steps, losses = random.Random(config.seed), 0, []
    for epoch in range(config.epochs):
        indices = order.sample(range(len(rows)), len(rows))
        for start in range(0, len(indices), config.batch_size):
            batch = indices[start : start + config.batch_size]
            ratio = (answer_logps(policy, [rows[i][0] for i in batch], pad_id, device)
                     - torch.tensor([reference[i] for i in batch], device=device))
            liked = torch.tensor([rows[i][1] for i in batch], device=device)
            weights = torch.tensor([weight[rows[i][1]] for i in batch], device=device)
            loss, _ = kto_loss(ratio, liked, config.beta, weights)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
            optimizer.step()
            steps += 1
            losses.append(loss.item())
        log.info("KTO epoch %d/%d: last batch loss %.3f", epoch + 1, config.epochs, losses[-1])
    optimizer.zero_grad(set_to_none=True)
    with torch.no_grad():
        after = [float(v) for start in range(0, len(rows), config.batch_size)
                 for v in answer_logps(policy, [t for t, _ in rows[start : start + config.batch_size]], pad_id, device)]
    ratios = [a - r for a, r in zip(after, reference)]
    stats |= {
        "steps": steps, "epochs": config.epochs, "loss_first": losses[0], "loss_last": losses[-1],
        "liked_log_ratio": sum(x for x, (_, liked) in zip(ratios, rows) if liked) / ups,
        "disliked_log_ratio": sum(x for x, (_, liked) in zip(ratios, rows) if not liked) / (len(rows) - ups),
        "seconds": time.perf_counter() - started,
    }
    if not all(math.isfinite(stats[k]) for k in ("loss_first", "loss_last", "liked_log_ratio", "disliked_log_ratio")):
        raise FloatingPointError(f"KTO is not finite: {stats}")
    log.info("KTO on %d thumbed answers (%d liked): log-ratio to the base %+.2f liked, %+.2f disliked, in %.1f s",
             len(rows), ups, stats["liked_log_ratio"], stats["disliked_log_ratio"], stats["seconds"])
    return SFTResult(policy, stats)


def kto_before_ppo(run, policy: nn.Module, tokenizer, thumbed: Sequence[RatedAnswer], config) -> nn.Module:
    """The round's KTO stage (retrain/round.py calls it after SFT, right before PPO): when
    `kto.enabled`, learn the training side's thumbed answers; records counts["kto_answers"],
    metrics["kto"] and timings["kto"] on the run. Returns the policy PPO starts from."""
    run.counts["kto_answers"] = len(thumbed) if config.kto.enabled else 0
    run.timings.setdefault("kto", 0.0)  # every stage is in the breakdown, 0 when skipped
    if not config.kto.enabled or not thumbed:
        run.metrics["kto"] = {"ran": False, "answers": len(thumbed),
                              "reason": "disabled" if not config.kto.enabled else "no thumbed answers on the training side"}
        return policy
    labelled = [(SFTExample.of_rated(r), r.label > 0) for r in thumbed]
    result = train_kto(policy, tokenizer, labelled, config.kto, config.ppo)
    run.metrics["kto"] = {"ran": result.stats["steps"] > 0, **result.stats}
    run.timings["kto"] += result.stats["seconds"]
    return result.model
