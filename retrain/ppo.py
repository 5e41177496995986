"""PPO for the chat policy: InstructGPT's recipe, written on plain torch, with a choice of
advantage estimator under the same clipped update.

Read top to bottom: the config, the pure pieces (whitening, the penalties, the KL-penalised
reward, GAE, group advantages, the KL controllers and budget), the model pieces (value head, answer
log-probs, sampling), the PPO loss, the critic's warm-up, and `train_ppo`, the loop. One
iteration:

  1. rollouts   batch_size / group_size prompts, group_size answers to each, sampled at
                temperature T (top_p 1, top_k off);
  2. forward    old log-probs and values (policy), reference log-probs (adapter off); the
                KL budget: rollouts whose mean KL to the reference is over the round's limit
                (`max_kl_step` above its first measurement, at most `max_kl`) put the
                weights (and Adam's moments) back where they were last measured within it;
                up to `kl_backtracks` times PPO goes on from there at a smaller learning
                rate, then it stops (after the last update, greedy answers look for loops
                and one more batch of rollouts measures its KL: either over its bound
                undoes it);
  3. scoring    reward_fn(prompts, answers) -> one score per answer; optional normalisation;
                the no-EOS penalty and the repetition penalty; the policy's greedy answers to
                `greedy_prompts` other prompts, whose loops (the gate's test) the update will
                push down;
  4. rewards    -beta * (logp - ref_logp) on every answer token, plus the score on the last one;
  5. advantages `advantage_estimator`:
                'rloo' (Ahmadian et al. 2024): each answer's return (score - beta * its KL)
                    minus the mean return of the other answers to the same prompt; every token
                    of the answer carries that sequence advantage, so the first word of an
                    answer learns as much as the last;
                'grpo' (Shao et al. 2024): the return minus the group's mean, over the group's std;
                'gae'  gamma 1, lambda 0.95 over the answer tokens with a learnt critic (value
                    head) that is warmed up on the first batch's returns before the policy moves
                    and carried from round to round in the checkpoint;
                whitened over the batch (optional);
  6. update     several epochs of minibatches: clipped policy loss (+ clipped value loss with
                'gae') (+ optional PPO-ptx language-model loss) (+ sequence-level unlikelihood
                on the looping greedy answers' repeated n-grams), gradients clipped to norm 1;
  7. controller the KL coefficient beta moves towards its target (or stays fixed).

Units: log-probs and KL in nats. "KL per sequence" is the sum over an answer's tokens of
logp - ref_logp, both from logits / T. Every tensor laid out per answer token is [batch, T_answer]
and aligned so that column t is the t-th generated token; `mask` marks the real tokens (a prefix:
everything up to and including the first EOS).

Dropout is off throughout: the policy stays in eval() mode while it trains (gradients flow the
same; only dropout and similar train-time noise are disabled), so rollouts, old log-probs and
the PPO ratio are all computed by the same deterministic function.

Multi-GPU: `accelerate launch -m ...` around a caller of `train_ppo` (`python -m retrain once` is
one); each process samples its own `batch_size` prompts per iteration (a global batch is
batch_size x processes), reward normalisation and the KL controller see every process's
answers, and gradients are averaged by accelerate.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

from .gate import repetitive

logger = logging.getLogger(__name__)

RewardFn = Callable[[list[list[dict]], list[str]], torch.Tensor]
ADVANTAGE_ESTIMATORS = ("rloo", "grpo", "gae")


# ------------------------------------------------------------------------------------------------
# Config


@dataclass
class PPOConfig:
    # rollouts
    num_iterations: int = field(
        default=1, metadata={"help": "PPO iterations: each samples a fresh batch of answers and updates on it."}
    )
    batch_size: int = field(
        default=16, metadata={"help": "Sampled answers per iteration, per process (batch_size / group_size prompts)."}
    )
    group_size: int = field(
        default=4,
        metadata={
            "help": "Answers sampled per prompt (k). 'rloo' and 'grpo' need >= 2: an answer's baseline is "
            "its siblings'; 'gae' works with any (1: one answer per prompt)."
        },
    )
    max_new_tokens: int = field(
        default=48, metadata={"help": "Answer length cap in tokens; an answer that reaches it without EOS is penalised."}
    )
    temperature: float = field(
        default=0.7,
        metadata={
            "help": "Sampling temperature T for rollouts. Policy, old and reference log-probs all come from "
            "logits / T, so the ratio and the KL are those of the distribution actually sampled."
        },
    )
    max_prompt_tokens: int = field(
        default=512,
        metadata={"help": "Prompts longer than this many tokens (after the chat template) are skipped, with a warning."},
    )
    # reward
    reward_norm: str = field(
        default="running",
        metadata={
            "help": "Reward whitening of the reward-model score before the KL penalty is added: 'none', "
            "'batch' (mean 0, std 1 within each batch) or 'running' (mean and std over all scores seen so far)."
        },
    )
    no_eos_penalty: float | None = field(
        default=-1.0,
        metadata={
            "help": "Penalty for answers that hit max_new_tokens without EOS, in the units of the (normalised) "
            "score. None turns it off."
        },
    )
    no_eos_penalty_mode: str = field(
        default="add",
        metadata={
            "help": "'add': the penalty is added to such answers' score, so a cut answer still carries the "
            "reward model's judgement; 'replace': they score exactly no_eos_penalty (when most answers are "
            "cut, as SmolLM2's at 64 tokens, that leaves PPO little but the penalty to learn from)."
        },
    )
    repetition_penalty: float | None = field(
        default=-1.0,
        metadata={
            "help": "Added to the (normalised) score of an answer that repeats itself (few distinct word "
            "n-grams among many, the gate's test: gate.repetition_ngram, gate.min_distinct_ngram_ratio). "
            "A reward model can rate a loop of simple phrases highly and the gate rejects a candidate "
            "that makes them, so PPO is taught not to (sampled rollouts loop far less often than the gate's "
            "greedy answers: in the loop it flagged 2 of 768). None turns it off."
        },
    )
    unlikelihood_coef: float = field(
        default=1.0,
        metadata={
            "help": "Sequence-level unlikelihood (Welleck et al. 2019) against greedy loops: every iteration the "
            "policy also answers greedy_prompts training prompts greedily, as the gate does, and where such an "
            "answer repeats itself (the gate's test) the tokens of its repeated n-grams get -log(1 - p) added to "
            "the loss, with this "
            "weight. Sampled rollouts almost never loop, so the repetition penalty rarely fires, while greedy "
            "answers do (41% of a round-3 candidate's at the gate). 0 turns it off (greedy_prompts: how many)."
        },
    )
    unlikelihood_ngram: int = field(
        default=4, metadata={"help": "n of the token n-grams whose repeats the unlikelihood term pushes down."}
    )
    greedy_prompts: int = field(
        default=16,
        metadata={
            "help": "Training prompts the policy answers greedily, as the gate does: in every iteration (the "
            "loops among those answers are what the unlikelihood term pushes down) and once after the last "
            "update (more than max_greedy_repetitive_rate of them looping undoes that update). In the loop, "
            "4 a round (the iteration's own prompts) caught one loop in 32 answers while the gate found 22-25% "
            "of a round's candidate's answers looping. 0: neither."
        },
    )
    max_greedy_repetitive_rate: float | None = field(
        default=0.1,
        metadata={"help": "The share of looping greedy answers that check allows (keep it at "
                          "gate.max_repetitive_rate); None: never undo for loops."},
    )
    # KL penalty
    kl_coef: float = field(
        default=0.05, metadata={"help": "Initial (or, without kl_target, fixed) beta: reward per nat of KL to the reference."}
    )
    kl_target: float | None = field(
        default=None,
        metadata={
            "help": "Adaptive KL (Ziegler et al. 2019): target mean KL per sequence in nats. None keeps beta fixed."
        },
    )
    kl_horizon: int = field(
        default=10_000,
        metadata={"help": "Adaptive KL horizon in episodes (answers): how fast beta moves towards the target."},
    )
    max_kl_step: float | None = field(
        default=6.0,
        metadata={
            "help": "KL budget of one round in nats per answer: how far the rollouts' mean KL to the reference "
            "may rise above the round's first measurement (before any update), checked before every update and "
            "once after the last: the first time it is over, PPO stops and goes back to the last weights "
            "measured within it. The reference stays the base model (InstructGPT's penalty), so the KL a "
            "promotion reached is where the next round starts, not spent from its budget: without a step, "
            "one good round took a run's whole budget and every later round could only trade within it. A "
            "fixed beta cannot hold a policy that a strong reward model pulls hard: in the loop one round "
            "went from 3.5 to 12.2 nats in 3 iterations. None: only max_kl bounds a round."
        },
    )
    kl_backtracks: int = field(
        default=3,
        metadata={
            "help": "Times a round may step back from an update that took the policy over its KL budget "
            "rather than stop: the weights and the optimiser's moments go back to the last ones measured "
            "within it and PPO goes on at kl_backtrack_factor times the learning rate (a backtracking line "
            "search, as TRPO's). One update moved SmolLM2's adapter 2-7 nats in the loop, the same "
            "learning rate from the same promoted policy (Adam's first steps are about lr per weight "
            "whatever the gradient), so a 6-nat step held 0-3 updates and a round whose first update "
            "overshot trained nothing. 0: the first update over the budget ends PPO."
        },
    )
    kl_backtrack_factor: float = field(
        default=0.5, metadata={"help": "Learning-rate factor of each step back (0 < factor < 1)."}
    )
    max_kl: float | None = field(
        default=16.0,
        metadata={
            "help": "KL ceiling in nats per answer over all rounds: the rollouts' mean KL to the reference "
            "never goes above it (a round that starts over it, from a policy promoted beyond it, may trade "
            "within its first measurement, not move further). Keep it under gate.max_kl (the gate measures "
            "greedy answers, which run 1.2-1.3x the sampled KL in the loop; sampled rollouts of 4 prompts are "
            "noisy). None, with max_kl_step None: no budget (and no measuring pass after the last update)."
        },
    )
    # advantages
    advantage_estimator: str = field(
        default="rloo",
        metadata={
            "help": "'rloo': leave-one-out group baseline, the sequence advantage on every token; 'grpo': "
            "group-normalised (mean and std of the prompt's answers); 'gae': per-token GAE with the learnt "
            "critic (value head), warmed up before the policy moves and kept across rounds."
        },
    )
    value_warmup_steps: int = field(
        default=16,
        metadata={
            "help": "'gae' only: optimiser steps fitting the critic to the first batch's returns (reward to "
            "go, unclipped) before the first policy update, so GAE starts from values that mean something."
        },
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount across answer tokens (1: none)."})
    lam: float = field(default=0.95, metadata={"help": "GAE lambda: bias/variance trade-off of the advantages."})
    whiten_advantages: bool = field(
        default=True, metadata={"help": "Whiten advantages (mean 0, std 1 over the batch's answer tokens)."}
    )
    # PPO update
    ppo_epochs: int = field(default=4, metadata={"help": "Passes over each batch of rollouts."})
    mini_batch_size: int = field(
        default=8, metadata={"help": "Answers per optimiser step; batch_size / mini_batch_size steps per epoch."}
    )
    micro_batch_size: int = field(
        default=8,
        metadata={"help": "Answers per forward pass (memory bound); micro-batches accumulate into a minibatch."},
    )
    cliprange: float = field(default=0.2, metadata={"help": "PPO ratio clip epsilon for the policy loss."})
    cliprange_value: float = field(
        default=0.2, metadata={"help": "Value clip range: new values stay within this of the rollout's values ('gae')."}
    )
    vf_coef: float = field(default=0.1, metadata={"help": "Weight of the value loss in the total loss ('gae'; the group estimators have no critic)."})
    value_grad_to_policy: bool = field(
        default=False,
        metadata={
            "help": "Let the value loss train the policy's weights too (shared trunk). Off: the value head "
            "reads detached hidden states, so the critic can never disturb the policy."
        },
    )
    # 5e-4 since each iteration is one step on fresh answers: at 2e-4 such steps moved SmolLM2 about
    # 0.1 nat each (4 steps of the loop's round 1: 0.05, 0.19, 0.32, 0.30), where 4 steps on 16
    # answers, each used twice, had moved it 1-1.5 nats an iteration.
    learning_rate: float = field(
        default=5e-4,
        metadata={"help": "AdamW learning rate of the policy (LoRA or full; set for a rank-16 LoRA adapter, "
                          "which starts at zero, taking one step per iteration's answers)."},
    )
    value_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the value head."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping: max global L2 norm per step."})
    # PPO-ptx
    ptx_coef: float = field(
        default=1.0,
        metadata={
            "help": "InstructGPT's PPO-ptx gamma: weight of the language-model loss (mean NLL per token) on "
            "ptx_texts, added at every step. Used only when ptx_texts are given; 0 turns it off."
        },
    )
    ptx_batch_size: int = field(default=4, metadata={"help": "ptx texts per optimiser step."})
    max_ptx_tokens: int = field(default=256, metadata={"help": "ptx texts are cut to this many tokens."})
    # policy
    use_lora: bool = field(
        default=True,
        metadata={
            "help": "Train a LoRA adapter (reference = same weights with the adapter off). Off: full fine-tuning "
            "against a frozen copy."
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (for a model that has no adapter yet)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha: the update is scaled by alpha / r."})
    lora_target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "Modules that get LoRA adapters ('all-linear': every linear but lm_head)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed for prompt order, sampling and initialisation (a round sets it from its own seed: round.seed)."})

    def __post_init__(self):
        if self.reward_norm not in ("none", "batch", "running"):
            raise ValueError(f"reward_norm must be 'none', 'batch' or 'running', not {self.reward_norm!r}")
        if self.no_eos_penalty_mode not in ("replace", "add"):
            raise ValueError(f"no_eos_penalty_mode must be 'replace' or 'add', not {self.no_eos_penalty_mode!r}")
        if self.temperature <= 0:
            raise ValueError("PPO needs sampling: temperature must be > 0")
        if self.max_new_tokens < 1:
            raise ValueError("max_new_tokens must be >= 1")
        if self.batch_size % self.mini_batch_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of mini_batch_size ({self.mini_batch_size})")
        if self.advantage_estimator not in ADVANTAGE_ESTIMATORS:
            raise ValueError(f"advantage_estimator must be one of {', '.join(ADVANTAGE_ESTIMATORS)}, not {self.advantage_estimator!r}")
        if self.group_size < 1 or self.batch_size % self.group_size:
            raise ValueError(f"batch_size ({self.batch_size}) must be a multiple of group_size ({self.group_size}) >= 1")
        if self.advantage_estimator != "gae" and self.group_size < 2:
            raise ValueError(f"advantage_estimator {self.advantage_estimator!r} needs group_size >= 2: an answer's baseline is its siblings'")
        if self.value_warmup_steps < 0:
            raise ValueError("value_warmup_steps must be >= 0")
        if self.greedy_prompts < 0:
            raise ValueError("greedy_prompts must be >= 0")
        if self.unlikelihood_coef < 0 or self.unlikelihood_ngram < 1:
            raise ValueError("unlikelihood_coef must be >= 0 and unlikelihood_ngram >= 1")
        if self.kl_backtracks < 0 or not 0 < self.kl_backtrack_factor < 1:
            raise ValueError(f"kl_backtracks must be >= 0 and 0 < kl_backtrack_factor < 1, not "
                             f"{self.kl_backtracks!r} and {self.kl_backtrack_factor!r}")
        for name in ("max_kl", "max_kl_step"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"{name} must be a positive number of nats (or None for no bound), not {value!r}")

    @property
    def has_kl_budget(self) -> bool:
        return self.max_kl is not None or self.max_kl_step is not None

    @property
    def uses_critic(self) -> bool:
        return self.advantage_estimator == "gae"


# ------------------------------------------------------------------------------------------------
# Pure pieces


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of x over the positions where mask is 1."""
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance of x over the masked positions."""
    mean = masked_mean(x, mask)
    n = mask.sum()
    var = masked_mean((x - mean) ** 2, mask)
    return var * n / (n - 1) if n > 1 else var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """x scaled to unit variance over the masked positions (and centred unless shift_mean=False);
    positions outside the mask come back as 0."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask


class RunningMoments:
    """Mean and standard deviation of every value seen so far (Chan et al.'s parallel update)."""

    def __init__(self):
        self.mean, self.var, self.count = 0.0, 1.0, 0

    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        n = x.numel()
        if n == 0:
            return
        batch_mean, batch_var = x.mean().item(), x.var(unbiased=False).item()
        total = self.count + n
        delta = batch_mean - self.mean
        m2 = self.var * self.count + batch_var * n + delta**2 * self.count * n / total
        self.mean += delta * n / total
        self.var = m2 / total
        self.count = total

    @property
    def std(self) -> float:
        # With fewer than two values there is no spread to divide by yet.
        return math.sqrt(self.var * self.count / (self.count - 1)) if self.count > 1 else 1.0


def normalise_scores(
    scores: torch.Tensor,
    mode: str,
    running: RunningMoments | None = None,
    batch_scores: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reward whitening of sequence scores: 'none' leaves them as they are; 'batch' whitens them
    with the mean and std of `batch_scores` (default: `scores`; pass the batch gathered from all
    processes); 'running' with the mean and std in `running` (the caller updates it first)."""
    if mode == "none":
        return scores
    if mode == "batch":
        population = scores if batch_scores is None else batch_scores
        std = population.std() if population.numel() > 1 else torch.ones((), device=scores.device)
        return (scores - population.mean()) / (std + 1e-8)
    if mode == "running":
        if running is None:
            raise ValueError("reward_norm='running' needs a RunningMoments")
        return (scores - running.mean) / (running.std + 1e-8)
    raise ValueError(f"unknown reward_norm {mode!r}")


def apply_no_eos_penalty(
    scores: torch.Tensor, has_eos: torch.Tensor, penalty: float | None, mode: str = "replace"
) -> torch.Tensor:
    """Penalise answers that were cut off at max_new_tokens (no EOS): their score gets `penalty`
    added ('add') or becomes `penalty` ('replace'). Answers with EOS are untouched.

    'add' is the default: finishing pays exactly `penalty` more than the same answer cut, and
    among cut answers the reward model's ranking stands. 'replace' erases it (every cut answer
    scores the same) and even lifts a cut answer the reward model rates below `penalty`."""
    if penalty is None:
        return scores
    cut = ~has_eos.bool()
    if mode == "replace":
        return torch.where(cut, torch.full_like(scores, penalty), scores)
    if mode == "add":
        return scores + cut.to(scores.dtype) * penalty
    raise ValueError(f"unknown no-EOS penalty mode {mode!r}")


def apply_repetition_penalty(
    scores: torch.Tensor, repeats: torch.Tensor, penalty: float | None
) -> torch.Tensor:
    """Add `penalty` to the score of every answer flagged in `repeats` (bool [B]); the others are
    untouched. Added, not replacing: among repetitive answers the reward model's order still counts."""
    if penalty is None:
        return scores
    return scores + repeats.to(scores.dtype) * penalty


def repeated_ngram_mask(tokens: Sequence[int], n: int) -> list[bool]:
    """Which tokens belong to a repeat: every token of an n-gram that already occurred earlier in
    `tokens` (its first occurrence is not marked). The candidates of Welleck et al.'s
    sequence-level unlikelihood."""
    marked = [False] * len(tokens)
    seen: set[tuple[int, ...]] = set()
    for start in range(len(tokens) - n + 1):
        gram = tuple(tokens[start : start + n])
        if gram in seen:
            marked[start : start + n] = [True] * n
        seen.add(gram)
    return marked


def unlikelihood_loss(logits: torch.Tensor, tokens: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
    """Mean over the candidate positions of -log(1 - p(token)), p from softmax(logits): [B, T, V],
    [B, T], [B, T] (bool or 0/1). Pushes exactly those tokens down, and nothing up in particular."""
    # -log(1 - p) = logsumexp(all logits) - logsumexp(the other tokens' logits): exact and with a
    # gradient however close p is to 1 (1 - p from p itself is 0 in float32 from p > 1 - 6e-8, and
    # the most confident loops are the ones this term is for).
    others = logits.scatter(-1, tokens.unsqueeze(-1), float("-inf")).logsumexp(-1)
    return masked_mean(logits.logsumexp(-1) - others, candidates.to(logits.dtype))


def kl_penalised_rewards(
    scores: torch.Tensor, logp: torch.Tensor, ref_logp: torch.Tensor, mask: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """InstructGPT's per-token reward: -beta * (logp - ref_logp) on every answer token, plus the
    sequence's score on its last real token.

    scores [B]; logp, ref_logp, mask [B, T]. Returns (rewards, kl, non_score_rewards), each [B, T]
    and 0 outside the mask; kl is the per-token estimate logp - ref_logp (nats)."""
    mask = mask.to(logp.dtype)
    kl = (logp - ref_logp) * mask
    non_score = -beta * kl
    rewards = non_score.clone()
    last = mask.sum(1).long() - 1
    if (last < 0).any():
        raise ValueError("every answer needs at least one token to carry its score")
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.to(rewards.dtype)
    return rewards, kl, non_score


def compute_gae(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0, lam: float = 0.95
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over answer tokens.

    rewards, values, mask [B, T], mask a prefix per row. Value after the last real token is 0 (the
    episode ends there). Returns (advantages, returns), 0 outside the mask; returns = advantages +
    values are the value head's regression targets."""
    mask = mask.to(values.dtype)
    rewards, values = rewards * mask, values * mask
    steps = rewards.shape[1]
    running = torch.zeros_like(rewards[:, 0])
    advantages_reversed = []
    for t in reversed(range(steps)):
        next_value = values[:, t + 1] if t + 1 < steps else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages_reversed.append(running)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)
    return advantages, (advantages + values) * mask


def reward_to_go(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Monte-Carlo returns per answer token: sum over t' >= t of gamma^(t'-t) * reward_t' [B, T],
    0 outside the mask. The critic's warm-up target: it needs no values to compute."""
    mask = mask.to(rewards.dtype)
    rewards = rewards * mask
    running = torch.zeros_like(rewards[:, 0])
    returns = []
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns.append(running)
    return torch.stack(returns[::-1], dim=1) * mask


def group_advantages(returns: torch.Tensor, group_size: int, estimator: str) -> torch.Tensor:
    """Sequence advantages [B] from sequence returns [B] laid out prompt by prompt (rows
    g*k .. g*k+k-1 answer prompt g).

    'rloo': R_i minus the mean of the other k-1 returns of its group (unbiased: the baseline
    does not depend on the answer it judges); 'grpo': (R_i - group mean) / (group std + 1e-4),
    the std over the group's k returns (unbiased estimate)."""
    if returns.numel() % group_size:
        raise ValueError(f"{returns.numel()} returns do not split into groups of {group_size}")
    if group_size < 2:
        raise ValueError("a group baseline needs at least 2 answers per prompt")
    grouped = returns.reshape(-1, group_size)
    if estimator == "rloo":
        baseline = (grouped.sum(1, keepdim=True) - grouped) / (group_size - 1)
        return (grouped - baseline).flatten()
    if estimator == "grpo":
        return ((grouped - grouped.mean(1, keepdim=True)) / (grouped.std(1, keepdim=True) + 1e-4)).flatten()
    raise ValueError(f"unknown group estimator {estimator!r}")


def whiten_sequences(advantages: torch.Tensor) -> torch.Tensor:
    """Sequence advantages scaled to mean 0, std 1 over the batch (one value per answer, so a
    long answer does not weigh more in the statistics than a short one)."""
    if advantages.numel() < 2:
        return advantages - advantages.mean()
    return (advantages - advantages.mean()) / (advantages.std() + 1e-8)


class FixedKLController:
    """beta stays where it was set (InstructGPT used a fixed 0.02)."""

    def __init__(self, beta: float):
        self.value = beta

    def update(self, current_kl: float, n_steps: int) -> None:
        pass


class AdaptiveKLController:
    """Ziegler et al. (2019): beta grows when KL is above target and shrinks below it, by at most
    20% of the target error per `horizon` episodes."""

    def __init__(self, beta: float, target: float, horizon: int):
        self.value, self.target, self.horizon = beta, target, horizon

    def update(self, current_kl: float, n_steps: int) -> None:
        """current_kl: mean KL per sequence (nats) of the last batch; n_steps: its answer count."""
        proportional_error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon


class KLBudget:
    """Keeps a round's policy within its KL budget, whatever beta is (and, through `restore`, lets
    the check after the last update undo it for other reasons).

    Every batch of rollouts measures the mean KL to the reference of the policy that sampled it. The
    first measurement (before any update) is where the round starts; the limit is `max_step` above
    it, and never above the ceiling `max_kl`, except that a round starting over the ceiling (from a
    policy promoted beyond it: the gate's bound is on greedy answers, this one on sampled ones) may
    trade within where it started, so no promotion can stop every later round before its first
    update. Within the limit, the trained weights are copied (a LoRA adapter: a few MB) before the
    update moves them; when a measurement is over, they go back to the last copy, the policy that
    measured within it (and, given the optimiser, so do its moments: a step back leaves no trace of
    the update it undid). Both bounds None: every check passes and nothing is copied."""

    def __init__(self, max_kl: float | None, module: nn.Module, keep: bool | None = None,
                 max_step: float | None = None, optimizer: torch.optim.Optimizer | None = None):  # fmt: skip
        """keep: copy the weights at every check that passes (default: when there is a budget)."""
        self.max_kl, self.max_step, self.module, self.optimizer = max_kl, max_step, module, optimizer
        self.bounded = max_kl is not None or max_step is not None
        self.keep = self.bounded if keep is None else keep
        self.kept: dict[str, torch.Tensor] | None = None
        self.kept_optimizer: dict[str, Any] | None = None
        self.kept_iteration: int | None = None  # the iteration whose starting weights were kept
        self.start: float | None = None  # the first measurement: where the round starts
        self.limit: float | None = None  # min(start + max_step, max_kl), or start when that is over both

    def check(self, kl: float, iteration: int) -> bool:
        """True: `kl` (of the weights as they are now) is within the budget, and they are kept.
        False: it is over (or not a number), and the last kept weights are back in place."""
        if self.bounded and self.limit is None and math.isfinite(kl):
            self.start = kl
            step = kl + self.max_step if self.max_step is not None else math.inf
            ceiling = self.max_kl if self.max_kl is not None else math.inf
            self.limit = max(kl, min(step, ceiling))
        if not self.bounded or (math.isfinite(kl) and kl <= self.limit):
            if self.keep:
                self.kept = {n: p.detach().clone() for n, p in self.module.named_parameters() if p.requires_grad}
                if self.optimizer is not None:
                    self.kept_optimizer = copy.deepcopy(self.optimizer.state_dict())
                self.kept_iteration = iteration
            return True
        self.restore()
        return False

    def restore(self) -> None:
        """The last kept weights (and optimiser moments) back in place (nothing to do before any
        were kept). The optimiser gets a copy: its steps update their moments in place."""
        if self.kept is not None:
            with torch.no_grad():
                for name, param in self.module.named_parameters():
                    if name in self.kept:
                        param.copy_(self.kept[name])
        if self.kept_optimizer is not None:
            self.optimizer.load_state_dict(copy.deepcopy(self.kept_optimizer))


# ------------------------------------------------------------------------------------------------
# Model pieces


def make_value_head(hidden_size: int, init: nn.Module | dict[str, torch.Tensor] | None = None) -> nn.Linear:
    """A scalar head on the policy's last hidden state. From the reward model's score head when
    given (a Linear, or a state dict with 'weight' [1, H] and optionally 'bias'): the critic then
    starts out predicting the reward model's view. Otherwise zeros: every value starts at 0."""
    head = nn.Linear(hidden_size, 1)
    with torch.no_grad():
        if init is None:
            head.weight.zero_()
            head.bias.zero_()
            return head
        state = init.state_dict() if isinstance(init, nn.Module) else init
        weight = state["weight"].detach().float().reshape(1, -1)
        if weight.shape[1] != hidden_size:
            raise ValueError(
                f"value_head_init has hidden size {weight.shape[1]}, the policy {hidden_size}: "
                "initialise from a reward model built on the same base model, or pass None"
            )
        head.weight.copy_(weight)
        bias = state.get("bias")
        head.bias.copy_(bias.detach().float().reshape(1) if bias is not None else torch.zeros(1))
    return head


def answer_logits_and_hidden(
    lm: nn.Module,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    response_ids: torch.Tensor,
    response_mask: torch.Tensor,
    temperature: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass over prompt + answer. Returns the temperature-scaled logits that predicted
    each answer token [B, T, V] and the last hidden state at the same positions [B, T, H] (the state
    before each token is chosen: what the value head reads)."""
    answer_len = response_ids.shape[1]
    input_ids = torch.cat([query_ids, response_ids], dim=1)
    attention_mask = torch.cat([query_mask, response_mask], dim=1)
    # Left padding: positions count real tokens only, as generate() counted them.
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    out = lm(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        output_hidden_states=True,
        logits_to_keep=answer_len + 1,  # only the positions that predict answer tokens
        use_cache=False,
    )
    logits = out.logits[:, :-1].float() / temperature
    hidden = out.hidden_states[-1][:, -answer_len - 1 : -1]
    return logits, hidden


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log p(token) under softmax(logits): [B, T, V], [B, T] -> [B, T]."""
    return torch.log_softmax(logits, dim=-1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of softmax(logits) per position: [B, T, V] -> [B, T]."""
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(-1)


class PolicyWithValueHead(nn.Module):
    """The trained modules in one wrapper, so accelerate/DDP syncs policy and critic together.
    Everything that needs gradients goes through this one forward (DDP's contract: one forward
    per backward), the PPO-ptx language-model loss included."""

    def __init__(self, policy: nn.Module, value_head: nn.Linear, value_grad_to_policy: bool):
        super().__init__()
        self.policy, self.value_head, self.value_grad_to_policy = policy, value_head, value_grad_to_policy

    def forward(self, query_ids, query_mask, response_ids, response_mask, temperature, lm_batch=None, ul_batch=None):
        """Returns (answer logits / T [B, T, V], values [B, T], ptx loss or None, the hidden
        states the values were read from [B, T, H], unlikelihood loss or None). ul_batch: the
        looping greedy answers (GreedyLoops.batch)."""
        logits, hidden = answer_logits_and_hidden(
            self.policy, query_ids, query_mask, response_ids, response_mask, temperature
        )
        if not self.value_grad_to_policy:
            hidden = hidden.detach()
        values = self.value_head(hidden.to(self.value_head.weight.dtype)).squeeze(-1)
        lm_loss = ptx_loss(self.policy, lm_batch) if lm_batch is not None else None
        ul_loss = None
        if ul_batch is not None:
            ul_logits, _ = answer_logits_and_hidden(
                self.policy, ul_batch["query_ids"], ul_batch["query_mask"], ul_batch["response_ids"],
                ul_batch["response_mask"], temperature,
            )  # fmt: skip
            ul_loss = unlikelihood_loss(ul_logits, ul_batch["response_ids"], ul_batch["candidates"])
        return logits, values, lm_loss, hidden, ul_loss


@contextmanager
def reference_policy(policy: nn.Module, frozen_copy: nn.Module | None) -> Iterator[nn.Module]:
    """The reference policy: the frozen copy (full fine-tuning) or the policy with its LoRA adapter
    switched off (the very same base weights, no second copy in memory)."""
    if frozen_copy is not None:
        yield frozen_copy
    else:
        with policy.disable_adapter():
            yield policy


def left_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids, attention mask) [B, L], padded on the left so every prompt ends at the
    same column and generation continues all of them from there."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        if len(seq):
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
    return ids.to(device), mask.to(device)


def mask_after_eos(
    response_ids: torch.Tensor, eos_ids: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sampled answers -> (ids with everything after the first EOS set to pad, mask [B, T] of the
    real tokens including that EOS, has_eos [B]). pad may equal EOS (SmolLM2), so the first EOS is
    found by position, never by pad id."""
    is_eos = torch.isin(response_ids, torch.tensor(list(eos_ids), device=response_ids.device))
    has_eos = is_eos.any(1)
    steps = response_ids.shape[1]
    first_eos = torch.where(has_eos, is_eos.float().argmax(1), torch.full_like(has_eos, steps, dtype=torch.long))
    lengths = torch.where(has_eos, first_eos + 1, first_eos)
    mask = (torch.arange(steps, device=response_ids.device)[None, :] < lengths[:, None]).long()
    return response_ids.masked_fill(mask == 0, pad_id), mask, has_eos


def eos_token_ids(tokenizer, model: nn.Module) -> list[int]:
    """Every id that ends an answer: the tokenizer's EOS and the model's generation EOS ids."""
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    gen_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos] if gen_eos is not None else [])
    if not ids:
        raise ValueError("the tokenizer has no EOS token: PPO needs one to tell finished answers from cut ones")
    return sorted(ids)


@torch.no_grad()
def sample_answers(
    lm: nn.Module, query_ids: torch.Tensor, query_mask: torch.Tensor, config: PPOConfig, eos_ids, pad_id: int
) -> torch.Tensor:
    """Sample answers at temperature T from the full distribution (top_p 1, top_k off, no repetition
    penalty), so their probabilities are exactly softmax(logits / T). Returns [B, T_answer] ids."""
    gen_config = GenerationConfig(
        do_sample=True,
        temperature=config.temperature,
        top_p=1.0,
        top_k=0,
        repetition_penalty=1.0,
        max_new_tokens=config.max_new_tokens,
        eos_token_id=list(eos_ids),
        pad_token_id=pad_id,
    )
    with adapter_merged(lm):
        out = lm.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config)
    return out[:, query_ids.shape[1] :]


@torch.no_grad()
def greedy_loops(
    lm: nn.Module,
    tokenizer,
    query_ids: torch.Tensor,
    query_mask: torch.Tensor,
    config: PPOConfig,
    eos_ids,
    pad_id: int,
    is_repetitive: Callable[[str], bool],
) -> tuple[dict[str, torch.Tensor] | None, float]:
    """The policy's greedy answers to the prompts (adapter merged, capped as rollouts are: what the
    gate will see), and, of those that loop by `is_repetitive`, the unlikelihood term's batch:
    prompts, answers, their mask and the repeated n-grams' tokens (`candidates`). Returns (that
    batch, or None when no answer loops; the share of answers that loop)."""
    gen_config = GenerationConfig(
        do_sample=False, max_new_tokens=config.max_new_tokens, eos_token_id=list(eos_ids), pad_token_id=pad_id
    )
    with adapter_merged(lm):
        out = lm.generate(input_ids=query_ids, attention_mask=query_mask, generation_config=gen_config)
    response_ids, mask, _ = mask_after_eos(out[:, query_ids.shape[1] :], eos_ids, pad_id)
    lengths = mask.sum(1).tolist()
    texts = [tokenizer.decode(ids[:n], skip_special_tokens=True) for ids, n in zip(response_ids.tolist(), lengths)]
    loops = [row for row, text in enumerate(texts) if is_repetitive(text)]
    if not loops:
        return None, 0.0
    candidates = torch.zeros_like(mask, dtype=torch.bool)
    for row in loops:
        marked = repeated_ngram_mask(response_ids[row, : lengths[row]].tolist(), config.unlikelihood_ngram)
        candidates[row, : lengths[row]] = torch.tensor(marked, dtype=torch.bool)
    rows = torch.tensor(loops, device=query_ids.device)
    batch = {"query_ids": query_ids[rows], "query_mask": query_mask[rows], "response_ids": response_ids[rows],
             "response_mask": mask[rows], "candidates": candidates[rows]}  # fmt: skip
    return batch, len(loops) / len(texts)


@contextmanager
def adapter_merged(lm: nn.Module) -> Iterator[None]:
    """A LoRA policy samples with its adapter merged into the base weights: the same function,
    without the adapter's extra matmuls at every linear of every decoding step (on CPU those
    small ops, not the FLOPs, dominate a 135M model's step). Unmerged again afterwards, for the
    training forward passes and the reference (adapter off)."""
    if not hasattr(lm, "merge_adapter") or getattr(lm, "peft_config", None) is None:
        yield
        return
    lm.merge_adapter()
    try:
        yield
    finally:
        lm.unmerge_adapter()


# ------------------------------------------------------------------------------------------------
# The PPO loss


def ppo_losses(
    logits: torch.Tensor,
    values: torch.Tensor,
    response_ids: torch.Tensor,
    mask: torch.Tensor,
    old_logp: torch.Tensor,
    old_values: torch.Tensor,
    advantages: torch.Tensor,
    returns: torch.Tensor,
    cliprange: float,
    cliprange_value: float,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Clipped surrogate policy loss and clipped value loss, both means over real answer tokens.
    Returns (policy_loss, value_loss, stats)."""
    mask = mask.to(values.dtype)
    logp = token_logprobs(logits, response_ids)
    log_ratio = logp - old_logp
    ratio = log_ratio.exp()
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    policy_loss = masked_mean(torch.max(pg_unclipped, pg_clipped), mask)

    values_clipped = old_values + (values - old_values).clamp(-cliprange_value, cliprange_value)
    vf_unclipped = (values - returns) ** 2
    vf_clipped = (values_clipped - returns) ** 2
    value_loss = 0.5 * masked_mean(torch.max(vf_unclipped, vf_clipped), mask)

    with torch.no_grad():
        stats = {
            "clip_frac": masked_mean((pg_clipped > pg_unclipped).float(), mask).item(),
            "value_clip_frac": masked_mean((vf_clipped > vf_unclipped).float(), mask).item(),
            # 0.5 * E[(log ratio)^2]: a low-variance estimate of KL(old || new) per token.
            "approx_kl": 0.5 * masked_mean(log_ratio**2, mask).item(),
            "ratio_mean": masked_mean(ratio, mask).item(),
            "entropy": masked_mean(entropy_from_logits(logits), mask).item(),
        }
    return policy_loss, value_loss, stats


def ptx_loss(lm: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """PPO-ptx: mean next-token NLL (nats per token, temperature 1) on SFT/pretraining texts, which
    keeps the policy from forgetting how to write while it chases the reward."""
    out = lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
    logits = out.logits[:, :-1].float()
    targets = batch["input_ids"][:, 1:]
    target_mask = batch["attention_mask"][:, 1:].float()
    nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none")
    return masked_mean(nll, target_mask)


def warm_up_critic(
    value_head: nn.Linear,
    hidden: torch.Tensor,
    returns: torch.Tensor,
    mask: torch.Tensor,
    steps: int,
    learning_rate: float,
    accelerator: Accelerator | None = None,
) -> tuple[float, float]:
    """Fit the value head to `returns` [B, T] from the (detached) hidden states [B, T, H] it
    reads, for `steps` AdamW steps of unclipped squared error over the real tokens, the policy
    untouched. Without it a fresh critic predicts ~0 and can only move cliprange_value a step,
    so GAE's advantages would be little more than a discounted score on the last tokens.
    Gradients are averaged across processes, so every process keeps the same head.
    Returns the mean squared error (per token) before and after."""
    mask = mask.to(returns.dtype)
    target = value_head
    # Fitted as a copy, then copied back: the head may sit inside a DDP wrapper whose gradient
    # hooks must see only the update's own backward passes.
    value_head = copy.deepcopy(target).requires_grad_(True)
    hidden = hidden.detach().to(value_head.weight.dtype)
    optimizer = torch.optim.AdamW(value_head.parameters(), lr=learning_rate, eps=1e-5)

    def error() -> torch.Tensor:
        return masked_mean((value_head(hidden).squeeze(-1) - returns) ** 2, mask)

    with torch.no_grad():
        before = error().item()
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        loss = error()
        loss.backward()
        if accelerator is not None and accelerator.num_processes > 1:
            for param in value_head.parameters():
                param.grad = accelerator.reduce(param.grad, "mean")
        optimizer.step()
    with torch.no_grad():
        after = error().item()
        target.load_state_dict(value_head.state_dict())
    return before, after


# ------------------------------------------------------------------------------------------------
# The loop


@dataclass
class PPOResult:
    stats: list[dict[str, float]] = field(metadata={"help": "One log dict per iteration (see train_ppo)."})
    model: nn.Module = field(metadata={"help": "The trained policy (a PeftModel with the LoRA adapter by default)."})
    value_head: nn.Linear = field(metadata={"help": "The trained value head (warm start for the next round)."})
    config: dict[str, Any] = field(metadata={"help": "The full PPOConfig as a dict, to store with the checkpoint."})
    counts: dict[str, int] = field(metadata={"help": "Prompts given, used and skipped (too long)."})
    kl_budget: dict[str, Any] = field(
        default_factory=dict,
        metadata={"help": "The KL budget's record: max_kl (the ceiling) and max_kl_step; start_kl (the first "
                          "measurement); limit (min(start_kl + max_kl_step, max_kl), or start_kl when the policy "
                          "started over that); stopped_at (the iteration whose rollouts "
                          "measured over it, num_iterations for the check after the last update, or None) with "
                          "stop_reason ('kl' with stop_kl, or 'loops': final_greedy_repetitive_rate over the "
                          "bound, of final_greedy_prompts greedy answers, set aside from the iterations' when "
                          "final_greedy_set_aside, taking final_greedy_s); kept_iteration (whose starting weights "
                          "are the result: None when none were ever within, a KL that is not a number); "
                          "final_kl and final_check_s of the check after the last update; backtracks "
                          "(one record per step back: iteration, kl, learning_rate, kept_iteration)."},
    )
    moved: bool = field(
        default=True,
        metadata={"help": "False when every update was undone: the model is the one PPO was given, as it was."},
    )


def prepare_policy(model: nn.Module, config: PPOConfig) -> tuple[nn.Module, nn.Module | None]:
    """Returns (policy to train, frozen reference copy or None when the reference is 'adapter off').
    A model that already carries a LoRA adapter keeps training that adapter (a later round)."""
    from peft import LoraConfig, PeftModel, get_peft_model

    model.eval()  # dropout off, for good: see the module docstring
    if config.use_lora:
        if not isinstance(model, PeftModel):
            lora = LoraConfig(
                r=config.lora_r,
                lora_alpha=config.lora_alpha,
                lora_dropout=0.0,
                target_modules=config.lora_target_modules,
                task_type="CAUSAL_LM",
            )
            model = get_peft_model(model, lora)
        for name, param in model.named_parameters():
            param.requires_grad_("lora_" in name)
        model.eval()
        return model, None
    if isinstance(model, PeftModel):
        raise ValueError("use_lora=False needs a plain model; merge the adapter first (merge_and_unload)")
    reference = copy.deepcopy(model).eval().requires_grad_(False)
    model.requires_grad_(True)
    return model, reference


def tokenize_prompts(tokenizer, prompts: list[list[dict]], max_tokens: int) -> tuple[list[int], list[list[int]]]:
    """Render each conversation with the chat template, ready for the assistant's turn. Returns the
    indices of the prompts kept and their token ids; prompts over max_tokens are dropped."""
    kept, token_lists = [], []
    for index, messages in enumerate(prompts):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= max_tokens:
            kept.append(index)
            token_lists.append(ids)
    return kept, token_lists


def tokenize_ptx(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    token_lists = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_tokens] for t in texts]
    return [ids for ids in token_lists if len(ids) >= 2]


def right_pad(sequences: Sequence[Sequence[int]], pad_id: int, device=None) -> dict[str, torch.Tensor]:
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        ids[row, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
        mask[row, : len(seq)] = 1
    return {"input_ids": ids.to(device), "attention_mask": mask.to(device)}


def cycle_batches(n_items: int, batch_size: int, generator: torch.Generator) -> Iterator[list[int]]:
    """Endless batches of indices: a fresh shuffle each pass, every item once per pass."""
    queue: list[int] = []
    while True:
        while len(queue) < batch_size:
            queue += torch.randperm(n_items, generator=generator).tolist()
        yield queue[:batch_size]
        queue = queue[batch_size:]


@dataclass
class Rollouts:
    """One batch of sampled answers and what the policy before the update makes of them; every
    [B, T] tensor is laid out per answer token (see the module docstring)."""

    query_ids: torch.Tensor  # [B, L] left-padded prompts
    query_mask: torch.Tensor
    response_ids: torch.Tensor  # [B, T] answers, pad after the first EOS
    mask: torch.Tensor  # [B, T] the real answer tokens, EOS included
    has_eos: torch.Tensor  # [B] the answer ended by itself
    old_logp: torch.Tensor  # [B, T] log-probs of the policy that sampled them (logits / T)
    old_values: torch.Tensor  # [B, T] its critic's values (0 outside the mask)
    ref_logp: torch.Tensor  # [B, T] the reference's log-probs
    hidden: torch.Tensor | None  # [B, T, H] the states the values were read from, when asked for
    generation_s: float
    forward_s: float

    @property
    def sequence_kl(self) -> torch.Tensor:
        """[B] KL to the reference per answer: the sum over its tokens of logp - ref_logp (nats)."""
        return ((self.old_logp - self.ref_logp) * self.mask).sum(1)


def roll_out(
    module: nn.Module,
    unwrapped: nn.Module,
    frozen_reference: nn.Module | None,
    prompt_tokens: list[list[int]],
    config: PPOConfig,
    eos_ids: list[int],
    pad_id: int,
    device,
    keep_hidden: bool = False,
) -> Rollouts:
    """Steps 1 and 2 of an iteration: sample an answer for each of `prompt_tokens`, then (no grad,
    micro-batched) the policy's log-probs and values and the reference's log-probs of them."""
    t_start = time.perf_counter()
    query_ids, query_mask = left_pad(prompt_tokens, pad_id, device)
    response_ids = sample_answers(unwrapped.policy, query_ids, query_mask, config, eos_ids, pad_id)
    response_ids, mask, has_eos = mask_after_eos(response_ids, eos_ids, pad_id)
    t_generated = time.perf_counter()

    old_logp, old_values, ref_logp, hidden_states = [], [], [], []
    with torch.no_grad():
        for rows in torch.arange(len(prompt_tokens)).split(config.micro_batch_size):
            args = (query_ids[rows], query_mask[rows], response_ids[rows], mask[rows])
            logits, values, _, hidden, _ = module(*args, config.temperature)
            old_logp.append(token_logprobs(logits, response_ids[rows]))
            old_values.append(values)
            if keep_hidden:
                hidden_states.append(hidden)
            with reference_policy(unwrapped.policy, frozen_reference) as reference:
                ref_logits, _ = answer_logits_and_hidden(reference, *args, config.temperature)
            ref_logp.append(token_logprobs(ref_logits, response_ids[rows]))
    fmask = mask.float()
    return Rollouts(
        query_ids, query_mask, response_ids, fmask, has_eos,
        old_logp=torch.cat(old_logp), old_values=torch.cat(old_values) * fmask, ref_logp=torch.cat(ref_logp),
        hidden=torch.cat(hidden_states) if keep_hidden else None,
        generation_s=t_generated - t_start, forward_s=time.perf_counter() - t_generated,
    )  # fmt: skip


def train_ppo(
    policy_model: nn.Module,
    tokenizer,
    prompts: list[list[dict]],
    reward_fn: RewardFn,
    config: PPOConfig | None = None,
    ptx_texts: list[str] | None = None,
    value_head_init: nn.Module | dict[str, torch.Tensor] | None = None,
    accelerator: Accelerator | None = None,
    is_repetitive: Callable[[str], bool] = repetitive,
) -> PPOResult:
    """Optimise `policy_model` with PPO against `reward_fn` on `prompts` (chat message lists).

    reward_fn(prompts, answers) -> tensor [B] of scores, one per answer (no grad needed). Returns a
    PPOResult whose `stats` has one dict per iteration with: score_mean (raw reward-model score),
    score_std, reward_mean (score after normalisation and the penalties), repetitive_rate (share of
    answers `is_repetitive` flags: the repetition penalty's), non_score_reward
    (-beta*KL summed per sequence), kl (mean KL per sequence to the reference, nats), beta,
    entropy, clip_frac, approx_kl, policy_loss, advantage_abs_mean, ptx_loss, response_length,
    eos_rate, and generation_s / forward_s / scoring_s / training_s / iteration_s; with 'gae'
    also value_loss, value_clip_frac, value_explained_variance and, on the first iteration,
    value_warmup_error_before / _after.
    """
    config = config or PPOConfig()
    accelerator = accelerator or Accelerator()
    set_seed(config.seed)
    device = accelerator.device

    kept, prompt_tokens = tokenize_prompts(tokenizer, prompts, config.max_prompt_tokens)
    counts = {"prompts": len(prompts), "prompts_used": len(kept), "prompts_too_long": len(prompts) - len(kept)}
    if counts["prompts_too_long"]:
        logger.warning("skipping %d prompts longer than %d tokens", counts["prompts_too_long"], config.max_prompt_tokens)
    if not kept:
        raise ValueError("no prompt fits max_prompt_tokens: nothing to train on")

    policy, frozen_reference = prepare_policy(policy_model, config)
    value_head = make_value_head(policy.config.hidden_size, value_head_init)
    # Without a critic the head gets no gradient: frozen, so DDP does not wait for one.
    value_head.requires_grad_(config.uses_critic)
    module = PolicyWithValueHead(policy, value_head, config.value_grad_to_policy)
    groups = [{"params": [p for p in policy.parameters() if p.requires_grad], "lr": config.learning_rate}]
    if config.uses_critic:
        groups.append({"params": list(value_head.parameters()), "lr": config.value_learning_rate})
    optimizer = torch.optim.AdamW(groups, eps=1e-5)
    module, optimizer = accelerator.prepare(module, optimizer)
    if accelerator.num_processes > 1:
        # Initialisation above is the same everywhere (DDP copies the main process's weights
        # anyway); from here on each process draws its own random numbers for its own answers.
        set_seed(config.seed, device_specific=True)
    if frozen_reference is not None:
        frozen_reference.to(device)
    unwrapped = accelerator.unwrap_model(module)

    eos_ids = eos_token_ids(tokenizer, unwrapped.policy)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_ids[0]
    kl_ctl = (
        AdaptiveKLController(config.kl_coef, config.kl_target, config.kl_horizon)
        if config.kl_target is not None
        else FixedKLController(config.kl_coef)
    )
    score_moments = RunningMoments()

    # Each process walks the same shuffled order and takes its own slice of every global batch
    # of prompts; each prompt is asked group_size times (rows g*k .. g*k+k-1: prompt g).
    order = torch.Generator().manual_seed(config.seed)
    world, rank = accelerator.num_processes, accelerator.process_index
    group, prompts_per_batch = config.group_size, config.batch_size // config.group_size
    prompt_batches = cycle_batches(len(kept), prompts_per_batch * world, order)

    def next_prompts() -> list[int]:
        """This process's prompts of the next global batch, each asked group_size times."""
        mine = next(prompt_batches)[rank * prompts_per_batch : (rank + 1) * prompts_per_batch]
        return [i for i in mine for _ in range(group)]  # one row per answer

    def rollouts_for(batch: list[int], keep_hidden: bool = False) -> tuple[Rollouts, float]:
        """The batch's rollouts and their mean KL per answer across processes (every process
        makes the same budget decision)."""
        rollouts = roll_out(
            module, unwrapped, frozen_reference, [prompt_tokens[i] for i in batch], config, eos_ids, pad_id,
            device, keep_hidden,
        )  # fmt: skip
        return rollouts, accelerator.reduce(rollouts.sequence_kl.mean(), "mean").item()

    # Greedy answers come from prompts of their own drawing (a generator of its own, so the
    # iterations' prompt order is the same with them on or off). The check after the last update
    # asks prompts set aside for it when there are enough: the iterations' greedy answers are what
    # the unlikelihood term trains on, and a check on them would see fewer loops than the gate does
    # on prompts the policy never trained on.
    greedy_order = torch.Generator().manual_seed(config.seed + 2)
    per_process = min(config.greedy_prompts, len(kept))
    greedy_pool = torch.randperm(len(kept), generator=greedy_order).tolist()
    final_rows = greedy_pool[: per_process * world] if len(kept) >= 2 * per_process * world else None
    iteration_pool = greedy_pool[per_process * world :] if final_rows else greedy_pool
    greedy_batches = (
        ([iteration_pool[i] for i in rows]
         for rows in cycle_batches(len(iteration_pool), per_process * world, greedy_order))
        if per_process else None
    )  # fmt: skip

    def greedy_check(batch: list[int] | None = None) -> tuple[dict[str, torch.Tensor] | None, float]:
        """This process's share of `batch` (default: the next greedy prompts) answered: (the
        unlikelihood batch of the looping answers or None, the share looping across processes)."""
        rows = (batch if batch is not None else next(greedy_batches))[rank * per_process : (rank + 1) * per_process]
        check_ids, check_mask = left_pad([prompt_tokens[i] for i in rows], pad_id, device)
        loops, share = greedy_loops(unwrapped.policy, tokenizer, check_ids, check_mask, config, eos_ids, pad_id,
                                    is_repetitive)  # fmt: skip
        return loops, accelerator.reduce(torch.tensor(share, device=device), "mean").item()

    loop_guard = greedy_batches is not None and config.max_greedy_repetitive_rate is not None
    can_step_back = config.has_kl_budget and config.kl_backtracks > 0
    budget = KLBudget(config.max_kl, unwrapped, keep=config.has_kl_budget or loop_guard, max_step=config.max_kl_step,
                      optimizer=optimizer if can_step_back else None)  # fmt: skip
    budget_log: dict[str, Any] = {"max_kl": config.max_kl, "max_kl_step": config.max_kl_step, "stopped_at": None,
                                  "kept_iteration": None, "backtracks": []}  # fmt: skip
    learning_rate = config.learning_rate  # the policy's: each step back scales it down
    unchecked_update = False  # an update no measurement has seen yet (the check after the loop's)
    # Whether the weights in place are other than those PPO was given, and whether the kept ones
    # are (a step back restores those, and with them this).
    moved = kept_moved = False
    ptx_tokens = tokenize_ptx(tokenizer, ptx_texts, config.max_ptx_tokens) if ptx_texts and config.ptx_coef else []
    ptx_order = torch.Generator().manual_seed(config.seed + 1)
    ptx_batches = cycle_batches(len(ptx_tokens), config.ptx_batch_size, ptx_order) if ptx_tokens else None

    stats_per_iteration: list[dict[str, float]] = []
    progress = tqdm(range(config.num_iterations), desc="ppo", disable=not accelerator.is_local_main_process)
    for iteration in progress:
        t_start = time.perf_counter()
        batch = next_prompts()
        batch_prompts = [prompts[kept[i]] for i in batch]
        warm_up = config.uses_critic and iteration == 0 and config.value_warmup_steps > 0

        # 1. rollouts, 2. old log-probs and values, reference log-probs ----------------------------
        rollouts, kl_per_sequence = rollouts_for(batch, keep_hidden=warm_up)
        within = budget.check(kl_per_sequence, iteration)
        unchecked_update = False
        if within:
            kept_moved = moved
        else:  # the kept weights are back in place
            moved = kept_moved
        if not within and len(budget_log["backtracks"]) < config.kl_backtracks and budget.kept is not None:
            # A step back: the last update went too far, not necessarily its direction. The kept
            # weights (and moments) are in place; the next iteration samples from them.
            learning_rate *= config.kl_backtrack_factor
            optimizer.param_groups[0]["lr"] = learning_rate
            budget_log["backtracks"].append({"iteration": iteration, "kl": kl_per_sequence, "learning_rate": learning_rate,
                                             "kept_iteration": budget.kept_iteration})  # fmt: skip
            logger.warning(
                "ppo iteration %d: the policy's KL to the reference is %.2f nats per answer, over the budget of "
                "%.2f: back to the weights iteration %d started from, and on at learning rate %.3g (step back %d "
                "of %d)", iteration, kl_per_sequence, budget.limit, budget.kept_iteration, learning_rate,
                len(budget_log["backtracks"]), config.kl_backtracks,
            )  # fmt: skip
            continue
        if not within:
            budget_log.update(stopped_at=iteration, stop_reason="kl", stop_kl=kl_per_sequence,
                              kept_iteration=budget.kept_iteration)  # fmt: skip
            logger.warning(
                "ppo iteration %d: the policy's KL to the reference is %.2f nats per answer, over the budget "
                "of %.2f: back to %s, and PPO stops", iteration, kl_per_sequence, budget.limit or math.nan,
                f"the weights iteration {budget.kept_iteration} started from" if budget.kept is not None
                else "the weights it started from (no update was made)",
            )  # fmt: skip
            break
        if iteration == 0 and budget.start is not None:
            budget_log["start_kl"] = budget.start
            if config.max_kl is not None and budget.start > config.max_kl:
                logger.warning(
                    "ppo: the policy starts %.2f nats per answer from the reference, over the ceiling of %.2f (it "
                    "was promoted beyond it): PPO may trade within %.2f but not move further", budget.start,
                    config.max_kl, budget.limit,
                )  # fmt: skip
            else:
                logger.info("ppo: the policy starts %.2f nats per answer from the reference; this round may go to %.2f",
                            budget.start, budget.limit)  # fmt: skip
        query_ids, query_mask, response_ids = rollouts.query_ids, rollouts.query_mask, rollouts.response_ids
        fmask, has_eos, old_logp, ref_logp = rollouts.mask, rollouts.has_eos, rollouts.old_logp, rollouts.ref_logp
        old_values, hidden_states = rollouts.old_values, rollouts.hidden
        mask = fmask.long()
        t_forward = time.perf_counter()

        # 3. scores ---------------------------------------------------------------------------------
        answers = [
            tokenizer.decode(ids[:length], skip_special_tokens=True).strip()
            for ids, length in zip(response_ids.tolist(), mask.sum(1).tolist())
        ]
        with torch.no_grad():
            raw_scores = torch.as_tensor(reward_fn(batch_prompts, answers), dtype=torch.float32).to(device).flatten()
        if raw_scores.shape[0] != len(answers):
            raise ValueError(f"reward_fn returned {raw_scores.shape[0]} scores for {len(answers)} answers")
        t_scored = time.perf_counter()

        # 3b. the policy's own greedy answers to prompts of their own drawing: the loops among
        # them are what the unlikelihood term pushes down in every minibatch's update.
        ul_batch, greedy_repetitive_rate, t_greedy = None, 0.0, time.perf_counter()
        if config.unlikelihood_coef > 0 and greedy_batches is not None:
            ul_batch, greedy_repetitive_rate = greedy_check()
        t_greedy = time.perf_counter() - t_greedy

        # 4. per-token rewards, 5. advantages --------------------------------------------------------
        all_scores = accelerator.gather(raw_scores)  # normalisation sees every process's scores
        if config.reward_norm == "running":
            score_moments.update(all_scores)
        scores = normalise_scores(raw_scores, config.reward_norm, running=score_moments, batch_scores=all_scores)
        scores = apply_no_eos_penalty(scores, has_eos, config.no_eos_penalty, config.no_eos_penalty_mode)
        repeats = torch.tensor([is_repetitive(a) for a in answers], device=device)
        scores = apply_repetition_penalty(scores, repeats, config.repetition_penalty)
        beta = kl_ctl.value
        rewards, kl, non_score = kl_penalised_rewards(scores, old_logp, ref_logp, fmask, beta)
        critic_stats: dict[str, float] = {}
        if config.uses_critic:
            if warm_up:  # the critic learns what a return looks like before the policy moves
                before, after = warm_up_critic(
                    unwrapped.value_head, hidden_states, reward_to_go(rewards, fmask, config.gamma), fmask,
                    config.value_warmup_steps, config.value_learning_rate, accelerator,
                )
                with torch.no_grad():
                    old_values = unwrapped.value_head(hidden_states.to(unwrapped.value_head.weight.dtype)).squeeze(-1) * fmask
                critic_stats = {"value_warmup_error_before": before, "value_warmup_error_after": after}
            advantages, returns = compute_gae(rewards, old_values, fmask, config.gamma, config.lam)
            critic_stats["value_explained_variance"] = (
                1 - masked_var(returns - old_values, fmask) / masked_var(returns, fmask).clamp(min=1e-8)
            ).item()
            if config.whiten_advantages:
                advantages = masked_whiten(advantages, fmask)
        else:
            # The answer is one action: its return is the score minus beta times its whole KL
            # (the per-token rewards summed), and every token carries the sequence advantage.
            sequence_advantages = group_advantages(rewards.sum(1), group, config.advantage_estimator)
            if config.whiten_advantages:
                sequence_advantages = whiten_sequences(sequence_advantages)
            advantages = sequence_advantages[:, None] * fmask
            returns = torch.zeros_like(fmask)  # no critic to regress

        # 6. PPO epochs over minibatches ------------------------------------------------------------
        step_stats: dict[str, list[float]] = {}
        for _ in range(config.ppo_epochs):
            for mini in torch.randperm(len(batch)).split(config.mini_batch_size):
                optimizer.zero_grad(set_to_none=True)
                micro_batches = mini.split(config.micro_batch_size)
                for position, rows in enumerate(micro_batches):
                    last = position == len(micro_batches) - 1
                    # The ptx batch rides with the minibatch's last micro-batch: one forward per backward.
                    lm_batch = (
                        right_pad([ptx_tokens[i] for i in next(ptx_batches)], pad_id, device)
                        if last and ptx_batches is not None
                        else None
                    )
                    # Gradients are averaged across processes once per minibatch, on its last backward.
                    with nullcontext() if last else accelerator.no_sync(module):
                        logits, values, lm_loss, _, ul_loss = module(
                            query_ids[rows], query_mask[rows], response_ids[rows], mask[rows], config.temperature,
                            lm_batch=lm_batch, ul_batch=ul_batch if last else None,
                        )  # fmt: skip
                        policy_loss, value_loss, micro_stats = ppo_losses(
                            logits, values, response_ids[rows], fmask[rows], old_logp[rows], old_values[rows],
                            advantages[rows], returns[rows], config.cliprange, config.cliprange_value,
                        )  # fmt: skip
                        total = policy_loss + config.vf_coef * value_loss if config.uses_critic else policy_loss
                        loss = total * len(rows) / len(mini)
                        if lm_loss is not None:
                            loss = loss + config.ptx_coef * lm_loss
                            micro_stats["ptx_loss"] = lm_loss.item()
                        if ul_loss is not None:
                            loss = loss + config.unlikelihood_coef * ul_loss
                            micro_stats["unlikelihood_loss"] = ul_loss.item()
                        accelerator.backward(loss)
                    micro_stats["policy_loss"] = policy_loss.item()
                    if config.uses_critic:
                        micro_stats["value_loss"] = value_loss.item()
                    else:  # no critic: its numbers would mean nothing
                        micro_stats.pop("value_clip_frac")
                    for key, value in micro_stats.items():
                        step_stats.setdefault(key, []).append(value)
                accelerator.clip_grad_norm_(module.parameters(), config.max_grad_norm)
                optimizer.step()
        unchecked_update = moved = True
        t_trained = time.perf_counter()

        # 7. KL controller, log -----------------------------------------------------------------------
        kl_ctl.update(kl_per_sequence, n_steps=len(batch) * world)

        def across_processes(x: torch.Tensor) -> float:
            return accelerator.reduce(x.float().mean().to(device), "mean").item()

        stats = {
            "iteration": iteration,
            "score_mean": across_processes(raw_scores),
            "score_std": all_scores.std().item() if all_scores.numel() > 1 else 0.0,
            "reward_mean": across_processes(scores),
            "non_score_reward": across_processes(non_score.sum(1)),
            "kl": kl_per_sequence,
            "beta": beta,
            "learning_rate": learning_rate,
            "response_length": across_processes(mask.sum(1)),
            "eos_rate": across_processes(has_eos),
            "repetitive_rate": across_processes(repeats),
            "greedy_repetitive_rate": across_processes(torch.tensor(greedy_repetitive_rate)),
            "advantage_abs_mean": masked_mean(advantages.abs(), fmask).item(),
            **critic_stats,
            **{key: sum(values) / len(values) for key, values in step_stats.items()},
            "generation_s": rollouts.generation_s,
            "forward_s": rollouts.forward_s,
            "scoring_s": t_scored - t_forward,
            "greedy_s": t_greedy,
            "training_s": t_trained - t_scored - t_greedy,
            "iteration_s": time.perf_counter() - t_start,
        }
        stats_per_iteration.append(stats)
        progress.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}", beta=f"{beta:.3g}")
        logger.info(
            "ppo iteration %d: score %.3f  kl %.3f nats/seq  beta %.4g  lr %.3g  entropy %.3f  clip %.3f  "
            "value loss %s  approx kl %.4f  length %.1f  eos %.2f  repetitive %.2f (greedy %.2f)  "
            "| gen %.1fs fwd %.1fs score %.1fs greedy %.1fs train %.1fs",
            iteration, stats["score_mean"], stats["kl"], beta, learning_rate, stats["entropy"], stats["clip_frac"],
            f"{stats['value_loss']:.4f}" if "value_loss" in stats else "-", stats["approx_kl"],
            stats["response_length"], stats["eos_rate"], stats["repetitive_rate"], stats["greedy_repetitive_rate"],
            stats["generation_s"], stats["forward_s"], stats["scoring_s"], stats["greedy_s"], stats["training_s"],
        )  # fmt: skip

    else:
        # The last update was never checked: greedy answers to fresh prompts look for loops, and one
        # more batch of rollouts measures its KL; either over its bound undoes it. (A run whose last
        # iteration stepped back ends on weights already measured.)
        looping = None
        if loop_guard and unchecked_update:
            t_check = time.perf_counter()
            _, looping = greedy_check(final_rows)
            budget_log.update(final_greedy_repetitive_rate=looping, final_greedy_prompts=per_process * world,
                              final_greedy_set_aside=final_rows is not None,
                              final_greedy_s=time.perf_counter() - t_check)  # fmt: skip
        if looping is not None and looping > config.max_greedy_repetitive_rate:
            budget.restore()
            moved = kept_moved
            budget_log.update(stopped_at=config.num_iterations, stop_reason="loops", kept_iteration=budget.kept_iteration)
            logger.warning(
                "ppo: after the last update %.0f%% of the policy's greedy answers to %d prompts loop (allowed: %.0f%%): "
                "back to the weights iteration %s started from", 100 * looping, per_process * world,
                100 * config.max_greedy_repetitive_rate, budget.kept_iteration,
            )  # fmt: skip
        elif config.has_kl_budget and unchecked_update:
            rollouts, kl_per_sequence = rollouts_for(next_prompts())
            budget_log.update(final_kl=kl_per_sequence, final_check_s=rollouts.generation_s + rollouts.forward_s)
            if not budget.check(kl_per_sequence, config.num_iterations):
                moved = kept_moved
                budget_log.update(stopped_at=config.num_iterations, stop_reason="kl", stop_kl=kl_per_sequence,
                                  kept_iteration=budget.kept_iteration)  # fmt: skip
                logger.warning(
                    "ppo: after the last update the policy's KL to the reference is %.2f nats per answer, over "
                    "the budget of %.2f: back to the weights iteration %d started from",
                    kl_per_sequence, budget.limit or math.nan, budget.kept_iteration,
                )  # fmt: skip
            else:
                logger.info("ppo: after the last update the policy's KL to the reference is %.2f nats per answer "
                            "(budget %.2f)", kl_per_sequence, budget.limit)  # fmt: skip

    budget_log["limit"] = budget.limit
    accelerator.wait_for_everyone()
    final = accelerator.unwrap_model(module)
    return PPOResult(
        stats=stats_per_iteration, model=final.policy, value_head=final.value_head, config=asdict(config), counts=counts,
        kl_budget=budget_log, moved=moved,
    )
