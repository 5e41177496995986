"""The reward model: a transformer body with a scalar head, trained on human preferences.

Read top to bottom: the config; the model (body + linear head on the mean of the answer's
hidden states or on its last token, normalisation); saving and loading; the loss;
`train_reward_model`, the loop.

Why the body + our own head rather than AutoModelForSequenceClassification: HF reads the last
token that is not the pad id, and SmolLM2's pad id is its end-of-turn id, so a sequence ending
in <|im_end|> would be read one token early; and it cannot average the answer's tokens. Here
the positions come from the masks. Owning the head also lets it start at
zero (every score 0 before training), gives it a learning rate of its own, and hands PPO a plain
`nn.Linear(hidden, 1)` to initialise its value head from.

Loss per batch (units: nats per item, an item being a comparison group or a thumb):
    Bradley-Terry   -log sigmoid(r_chosen - r_rejected), each group's pairs averaged, so a prompt
                    with K ranked answers (C(K,2) pairs) weighs as much as a prompt with one pair
    tie             tie_weight * -(log sigmoid(d) + log sigmoid(-d)) / 2 for a 'same' verdict,
                    d = r_a - r_b: Bradley-Terry with the target probability 1/2 (a soft label),
                    least (log 2) at d = 0; a tie shares its group's weight like any pair
    pointwise       thumb_weight * -log sigmoid(label * r) for every thumbed answer
    centering       center_coef * mean(r)^2: BT cannot see a shared shift of all scores
Scores are then normalised so the serving policy's answers average 0 with std 1: PPO's KL
coefficient is in reward units, so a stable scale keeps beta meaningful across rounds.

Multi-GPU: `accelerate launch -m retrain.reward --data prefs.jsonl --out DIR --base-model M`
(the CLI at the bottom); each process trains on its shard, evaluation is split across processes
and summed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from functools import partial
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import set_seed
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModel, AutoTokenizer

from deploy.canary import wilson_interval

from .reward_data import (
    ComparisonGroup,
    Conversation,
    EncodedGroup,
    EncodedThumb,
    Message,
    PreferencePair,
    RewardData,
    ThumbLabel,
    collate,
    encode_answer,
    encode_groups,
    encode_thumbs,
    item_length,
    length_grouped_batches,
    split_held_out,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "reward_model.json"


# -- config ------------------------------------------------------------------------------------

@dataclass
class RewardConfig:
    # model shape (a warm start keeps the previous model's shape: see SHAPE_FIELDS)
    base_model: str = field(default="", metadata={"help": "Local HF model directory of the backbone (e.g. the converted policy)."})
    lora_rank: int = field(default=16, metadata={"help": "LoRA rank on every linear layer of the trained blocks; 0 trains those blocks' weights fully."})
    lora_alpha: float = field(default=32.0, metadata={"help": "LoRA scaling numerator (the update is scaled by alpha / rank)."})
    num_layers: int | None = field(default=None, metadata={"help": "Keep only the bottom N transformer blocks of the backbone (None: all). Cost is proportional to depth: the knob for a CPU budget."})
    trainable_layers: int | None = field(default=None, metadata={"help": "Only the top N transformer blocks learn (None: all). Blocks below build no autograd graph, so backward cost shrinks with N."})
    pooling: str = field(default="mean", metadata={"help": "What the head reads: 'mean' of the answer's own tokens' hidden states, or 'last', the state at the answer's end-of-turn token."})
    # data
    max_tokens: int = field(default=512, metadata={"help": "Longest prompt + answer, in tokens; longer ones lose their oldest tokens (the answer's end is kept)."})
    held_out_percent: float = field(default=10.0, metadata={"help": "Percent of prompts held out for pairwise accuracy when no evaluation data is given."})
    # optimisation
    epochs: int = field(default=1, metadata={"help": "Passes over the training data."})
    batch_size: int = field(default=8, metadata={"help": "Items (comparison groups or thumbs) per forward pass, per process."})
    grad_accum_steps: int = field(default=1, metadata={"help": "Forward passes per optimizer step."})
    learning_rate: float = field(default=2e-4, metadata={"help": "AdamW learning rate of the body (LoRA or full weights)."})
    head_learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate of the scalar head (a fresh layer learns faster)."})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay."})
    warmup_fraction: float = field(default=0.05, metadata={"help": "Share of steps with a linear learning-rate warmup; the rest decay linearly to 0."})
    max_grad_norm: float = field(default=1.0, metadata={"help": "Gradient clipping (global L2 norm)."})
    # loss
    thumb_weight: float = field(default=0.5, metadata={"help": "Weight of one thumb's pointwise loss relative to one comparison group."})
    tie_weight: float = field(default=1.0, metadata={"help": "Weight of a 'same' verdict's tie term (pulls the two scores together) relative to a strict pair of the same group; 0 leaves ties out."})
    center_coef: float = field(default=0.01, metadata={"help": "Reward centering: coef * mean(score)^2 per batch keeps raw scores near 0."})
    # evaluation and normalisation
    eval_batch_size: int = field(default=16, metadata={"help": "Items per forward pass when evaluating and scoring."})
    eval_at_start: bool = field(default=False, metadata={"help": "Also measure held-out accuracy before training (useful for a warm start)."})
    normalization_samples: int = field(default=256, metadata={"help": "Most reference answers scored to set the normalisation (mean 0, std 1)."})
    # machinery
    seed: int = field(default=0, metadata={"help": "Seed for initialisation, batch order and sampling."})
    mixed_precision: str = field(default="no", metadata={"help": "accelerate's mixed precision: 'no', 'bf16' or 'fp16' (GPU)."})
    log_every: int = field(default=10, metadata={"help": "Optimizer steps between logged lines."})

    def __post_init__(self):
        if self.lora_rank < 0:
            raise ValueError("lora_rank must be >= 0 (0: train the blocks fully)")
        if self.num_layers is not None and self.num_layers < 1:
            raise ValueError("num_layers must be >= 1, or None for all")
        if self.trainable_layers is not None and self.trainable_layers < 1:
            raise ValueError("trainable_layers must be >= 1, or None for all")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, not {self.pooling!r}")
        if self.batch_size < 1 or self.eval_batch_size < 1 or self.grad_accum_steps < 1 or self.epochs < 0:
            raise ValueError("batch sizes and grad_accum_steps must be >= 1, epochs >= 0")


# What a saved model is made of: a warm start takes these from the model it starts from.
SHAPE_FIELDS = ("base_model", "num_layers", "lora_rank", "lora_alpha", "trainable_layers", "pooling")
POOLINGS = ("mean", "last")


# -- the model ---------------------------------------------------------------------------------

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Column of the last real token of each row, from the mask alone (pad ids can be real
    tokens: SmolLM2's pad is its end-of-turn token). Right or left padding both work."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask).argmax(dim=1)


class RewardModel(nn.Module):
    """score = head(pooled hidden states); normalised = (raw - bias) / scale.

    Pooling 'mean' averages the answer's own tokens (the batch's `answer_mask`); 'last' reads
    the last real token, the answer's end-of-turn. Mean is the default because a preference
    about an answer's style is spread over all its tokens: trained on the same 96 conversations
    of `simple` votes, mean pooling ranked 0.74 of 80 held-out pairs, the last token 0.625
    (bench/judge_probe.py; README, Results)."""

    def __init__(self, body: nn.Module, head: nn.Linear, tokenizer, config: RewardConfig, bias: float = 0.0, scale: float = 1.0):
        super().__init__()
        self.body, self.head, self.tokenizer, self.config = body, head, tokenizer, config
        self.bias, self.scale = bias, scale  # set by `fit_normalization`, stored with the model

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                answer_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw scores [B] (float32) of token sequences [B, T]; `answer_mask` marks the answers'
        own tokens (None: every real token counts as the answer's)."""
        hidden = self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        if self.config.pooling == "mean":
            weights = (attention_mask if answer_mask is None else answer_mask).unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1)
        else:
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pooled = hidden[rows, last_token_index(attention_mask)]
        return self.head(pooled.to(self.head.weight.dtype)).squeeze(-1).float()

    def normalize(self, raw: torch.Tensor) -> torch.Tensor:
        return (raw - self.bias) / self.scale

    @torch.no_grad()
    def score(self, conversations: Sequence[Conversation], batch_size: int | None = None, normalized: bool = True) -> torch.Tensor:
        """Scores [N] (float32, on CPU) of (prompt messages, answer) pairs, in the given order.

        Batched by similar length; no gradients; the model's train/eval mode is restored after.
        Normalised scores: the serving policy's answers average 0 with std 1."""
        batch_size = batch_size or self.config.eval_batch_size
        encoded = [EncodedThumb(ids, 1, answer_tokens) for ids, answer_tokens in
                   (encode_answer(self.tokenizer, prompt, answer, self.config.max_tokens) for prompt, answer in conversations)]
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i].sequence))
        scores = torch.empty(len(encoded), dtype=torch.float32)
        device = self.head.weight.device
        was_training = self.training
        self.eval()
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = collate([encoded[i] for i in rows], self.pad_id)
                raw = self(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["answer_mask"].to(device))
                scores[rows] = raw.cpu()
        finally:
            self.train(was_training)
        return self.normalize(scores) if normalized else scores

    def score_answers(self, prompts: Sequence[Sequence[Message]], answers: Sequence[str]) -> torch.Tensor:
        """PPO's reward_fn(prompts, answers) -> normalised scores [B]."""
        return self.score(list(zip(prompts, answers)))

    def fit_normalization(self, reference: Sequence[Conversation]) -> dict:
        """Set bias and scale so the reference answers (the serving policy's) score mean 0, std 1."""
        raw = self.score(reference, normalized=False)
        self.bias = float(raw.mean()) if len(raw) else 0.0
        spread = float(raw.std()) if len(raw) > 1 else 0.0
        self.scale = spread if spread > 1e-6 else 1.0  # one answer, or all equal: shift only
        return {"bias": self.bias, "scale": self.scale, "samples": len(raw)}


def _load_body(path: str | os.PathLike, num_layers: int | None) -> nn.Module:
    """The backbone without its LM head, cut to its bottom `num_layers` blocks if asked (a
    model with fewer blocks keeps all of them)."""
    depth = AutoConfig.from_pretrained(path).num_hidden_layers
    if not num_layers or num_layers >= depth:
        return AutoModel.from_pretrained(path, dtype=torch.float32)
    # The blocks left out are reported as unexpected weights (transformers logs its load report
    # through modeling_utils' logger): intended here, so that one load is quiet.
    report = logging.getLogger("transformers.modeling_utils")
    level = report.level
    report.setLevel(logging.ERROR)
    try:
        return AutoModel.from_pretrained(path, dtype=torch.float32, num_hidden_layers=num_layers)
    finally:
        report.setLevel(level)


def _apply_trainable_layers(body: nn.Module, config: RewardConfig) -> nn.Module:
    """Attach LoRA to (or unfreeze) the top `trainable_layers` blocks; everything else frozen."""
    from peft import LoraConfig, get_peft_model

    n_layers = body.config.num_hidden_layers
    top = range(n_layers - min(config.trainable_layers or n_layers, n_layers), n_layers)
    if config.lora_rank > 0:
        # "all-linear" spelled out: peft takes a layer range only with explicit module names.
        linear_names = sorted({name.rsplit(".", 1)[-1] for name, module in body.named_modules() if isinstance(module, nn.Linear)})
        lora = LoraConfig(
            r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0, target_modules=linear_names,
            layers_to_transform=list(top), layers_pattern="layers",
        )
        return get_peft_model(body, lora)
    for name, param in body.named_parameters():
        in_top = any(f"layers.{i}." in name for i in top) or name.startswith("norm.")
        param.requires_grad_(config.trainable_layers is None or in_top)
    return body


def new_reward_model(config: RewardConfig) -> RewardModel:
    """The backbone from `config.base_model` with a zero-initialised head: every score starts at 0."""
    if not config.base_model:
        raise ValueError("RewardConfig.base_model is empty: give a local model directory (e.g. the converted policy)")
    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    body = _apply_trainable_layers(_load_body(config.base_model, config.num_layers), config)
    head = nn.Linear(body.config.hidden_size, 1)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    return RewardModel(body, head, tokenizer, config)


def save_reward_model(model: RewardModel, path: str | os.PathLike, metrics: dict | None = None) -> Path:
    """Write the model directory atomically: built beside `path`, then renamed into place (a
    reader sees the old directory or the new one, never half of one).

    Layout: reward_model.json (format, config, normalisation, metrics), head.safetensors,
    tokenizer/, and adapter/ (LoRA) or body/ (full weights)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    staging.mkdir()
    try:
        model.body.save_pretrained(staging / ("adapter" if model.config.lora_rank > 0 else "body"))
        head = model.head.state_dict()
        save_file({k: v.detach().float().cpu().contiguous() for k, v in head.items()}, staging / "head.safetensors")
        model.tokenizer.save_pretrained(staging / "tokenizer")
        manifest = {
            "format_version": FORMAT_VERSION,
            "config": asdict(model.config),
            "normalization": {"bias": model.bias, "scale": model.scale},
            "metrics": metrics or {},
        }
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=2, default=str))
        if path.exists():
            retired = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
            path.rename(retired)
            staging.rename(path)
            shutil.rmtree(retired, ignore_errors=True)
        else:
            staging.rename(path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return path


def saved_config(manifest: dict) -> RewardConfig:
    """The config a saved model was trained with; models saved before `pooling` existed read
    the last token."""
    return RewardConfig(**{"pooling": "last", **manifest["config"]})


def read_manifest(path: str | os.PathLike) -> dict:
    manifest_path = Path(path) / MANIFEST
    if not manifest_path.exists():
        raise FileNotFoundError(f"{path} is not a reward model directory (no {MANIFEST}); train one with train_reward_model")
    return json.loads(manifest_path.read_text())


def load_reward_model(path: str | os.PathLike, *, base_model: str | None = None, trainable: bool = False) -> RewardModel:
    """A saved reward model, ready to score (eval mode) or, with `trainable`, to train on.

    `base_model` overrides the backbone directory recorded in the manifest (a LoRA model
    stores only its adapter), e.g. when DATA_DIR has moved."""
    path = Path(path)
    manifest = read_manifest(path)
    if manifest["format_version"] != FORMAT_VERSION:
        raise ValueError(f"{path}: reward model format {manifest['format_version']}, this code reads {FORMAT_VERSION}")
    config = saved_config(manifest)
    if base_model:
        config.base_model = str(base_model)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    if config.lora_rank > 0:
        from peft import PeftModel

        body = PeftModel.from_pretrained(_load_body(config.base_model, config.num_layers), path / "adapter", is_trainable=trainable)
    else:
        body = _load_body(path / "body", None)  # saved already cut to num_layers
        if trainable:
            body = _apply_trainable_layers(body, config)
        else:
            body.requires_grad_(False)
    head = nn.Linear(body.config.hidden_size, 1)
    head.load_state_dict(load_file(path / "head.safetensors"))
    head.requires_grad_(trainable)
    model = RewardModel(body, head, tokenizer, config, **manifest["normalization"])
    return model.train(trainable)


# -- the loss ----------------------------------------------------------------------------------

def preference_loss(scores: torch.Tensor, batch: dict, thumb_weight: float, center_coef: float,
                    tie_weight: float = 1.0) -> tuple[torch.Tensor, dict]:
    """Mean loss per item of a batch built by `reward_data.collate` (see the module docstring)."""
    items = batch["items"].clamp(min=1).to(scores.dtype)
    margins = scores[batch["pair_chosen"]] - scores[batch["pair_rejected"]]
    bradley_terry = (batch["pair_weight"] * -F.logsigmoid(margins)).sum()
    tie_margins = scores[batch["tie_a"]] - scores[batch["tie_b"]]
    ties = (batch["tie_weight"] * -(F.logsigmoid(tie_margins) + F.logsigmoid(-tie_margins)) / 2).sum()
    pointwise = (-F.logsigmoid(batch["thumb_label"] * scores[batch["thumb_index"]])).sum()
    centering = scores.mean() ** 2
    loss = (bradley_terry + tie_weight * ties + thumb_weight * pointwise) / items + center_coef * centering
    stats = {
        "pairs": margins.numel(),
        "pairs_correct": float((margins > 0).sum() + 0.5 * (margins == 0).sum()),
        "ties": tie_margins.numel(),
        "thumbs": batch["thumb_index"].numel(),
    }
    return loss, stats


@torch.no_grad()
def evaluate(model: nn.Module, groups: Sequence[EncodedGroup], thumbs: Sequence[EncodedThumb], batch_size: int,
             pad_id: int, accelerator: Accelerator) -> dict:
    """Held-out pairwise accuracy on the strict pairs (an equal score counts half) with its
    Wilson interval (`accuracy_interval`, 95%), thumb accuracy (sign of the raw score) likewise,
    and the mean |margin| on 'same' verdicts. Each process takes every n-th batch and the sums
    are added up: exact, no duplicates."""
    # The bare model: a DDP forward syncs buffers with the other processes, and processes may
    # have different numbers of batches here (one batch more on some: that would hang).
    model = accelerator.unwrap_model(model)
    was_training = model.training
    model.eval()
    device = accelerator.device
    totals = torch.zeros(7, device=device)  # pairs, correct, sum of margins, thumbs, correct, ties, sum |tie margin|
    items: list[EncodedGroup | EncodedThumb] = [*groups, *thumbs]
    order = sorted(range(len(items)), key=lambda i: item_length(items[i]))
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for rows in batches[accelerator.process_index :: accelerator.num_processes]:
        batch = collate([items[i] for i in rows], pad_id)
        scores = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), batch["answer_mask"].to(device))
        margins = scores[batch["pair_chosen"].to(device)] - scores[batch["pair_rejected"].to(device)]
        thumb_scores = scores[batch["thumb_index"].to(device)]
        totals += torch.stack([
            torch.tensor(float(margins.numel()), device=device),
            (margins > 0).sum() + 0.5 * (margins == 0).sum(),
            margins.sum(),
            torch.tensor(float(thumb_scores.numel()), device=device),
            ((thumb_scores > 0) == (batch["thumb_label"].to(device) > 0)).sum(),
            torch.tensor(float(batch["tie_a"].numel()), device=device),
            (scores[batch["tie_a"].to(device)] - scores[batch["tie_b"].to(device)]).abs().sum(),
        ]).float()
    totals = accelerator.reduce(totals, reduction="sum")
    model.train(was_training)
    pairs, correct, margin_sum, n_thumbs, thumbs_correct, n_ties, tie_margin_sum = totals.tolist()
    return accuracy_report(correct, pairs, thumbs_correct, n_thumbs) | {
        "mean_margin": margin_sum / pairs if pairs else None,
        "ties": int(n_ties),
        "tie_mean_abs_margin": tie_margin_sum / n_ties if n_ties else None,
    }


def accuracy_report(correct: float, pairs: float, thumbs_correct: float = 0.0, thumbs: float = 0.0,
                    confidence: float = 0.95) -> dict:
    """Pairwise and thumb accuracy, each with its count and Wilson interval: 0.80 on 5 pairs
    ([0.38, 0.96]) and on 500 ([0.76, 0.83]) are different claims."""
    return {
        "accuracy": correct / pairs if pairs else None,
        "pairs": int(pairs),
        "accuracy_interval": list(wilson_interval(correct, pairs, confidence)) if pairs else None,
        "thumb_accuracy": thumbs_correct / thumbs if thumbs else None,
        "thumbs": int(thumbs),
        "thumb_accuracy_interval": list(wilson_interval(thumbs_correct, thumbs, confidence)) if thumbs else None,
    }


# -- training ----------------------------------------------------------------------------------

def _running_totals() -> dict:
    return {"loss": 0.0, "batches": 0, "pairs": 0, "correct": 0.0}


class EpochBatches:
    """Length-grouped batches of item indices, reshuffled on every pass (each process iterates
    it the same number of times, so every process sees the same order before sharding)."""

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.passes = list(lengths), batch_size, seed, 0

    def __len__(self) -> int:
        return math.ceil(len(self.lengths) / self.batch_size)

    def __iter__(self):
        self.passes += 1
        return length_grouped_batches(self.lengths, self.batch_size, self.seed, self.passes)


def train_reward_model(
    data: RewardData,
    config: RewardConfig,
    out_dir: str | os.PathLike,
    *,
    eval_data: RewardData | None = None,
    reference: Sequence[Conversation] | None = None,
    init_from: str | os.PathLike | None = None,
) -> dict:
    """Train a reward model on `data`, save it to `out_dir` (atomically), return its metrics.

    eval_data: held-out data for pairwise accuracy; None holds out `held_out_percent` of the
        prompts of `data` (a stable split by prompt).
    reference: the serving policy's (prompt, answer) pairs, which the normalisation centres on
        0; None uses answers from the training data.
    init_from: a previous reward model directory to warm-start from (its shape is kept).
    """
    started = time.perf_counter()
    accelerator = Accelerator(gradient_accumulation_steps=config.grad_accum_steps, mixed_precision=config.mixed_precision)
    set_seed(config.seed)
    if eval_data is None:
        data, eval_data = split_held_out(data, config.held_out_percent)
    if not data.groups and not data.thumbs:
        raise ValueError("no training data: a reward model needs comparison groups or thumbs")

    # The model: fresh, or the previous one with its shape (the new config's training settings).
    if init_from is not None:
        previous = saved_config(read_manifest(init_from))
        kept = {name: getattr(previous, name) for name in SHAPE_FIELDS if name != "base_model" or not config.base_model}
        config = dataclasses.replace(config, **kept)
        model = load_reward_model(init_from, base_model=config.base_model or None, trainable=True)
        model.config = config
    else:
        model = new_reward_model(config)
    model.train()
    pad_id = model.pad_id

    # Token ids once, up front: each distinct answer of a group is one sequence.
    tokenizer = model.tokenizer
    items: list[EncodedGroup | EncodedThumb] = [
        *encode_groups(tokenizer, data.groups, config.max_tokens),
        *encode_thumbs(tokenizer, data.thumbs, config.max_tokens),
    ]
    eval_groups = encode_groups(tokenizer, eval_data.groups, config.max_tokens)
    eval_thumbs = encode_thumbs(tokenizer, eval_data.thumbs, config.max_tokens)
    batches = EpochBatches([item_length(item) for item in items], config.batch_size, config.seed)
    loader = DataLoader(items, batch_sampler=batches, collate_fn=partial(collate, pad_id=pad_id))

    # AdamW, head on its own learning rate; linear warmup then linear decay to 0.
    body_params = [p for p in model.body.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        [{"params": body_params, "lr": config.learning_rate}, {"params": list(model.head.parameters()), "lr": config.head_learning_rate}],
        weight_decay=config.weight_decay,
    )
    # The schedule counts optimizer steps of one process doing all batches: accelerate steps a
    # prepared scheduler once per process per step, so N processes walk it N times faster.
    total_steps = max(1, math.ceil(len(batches) / config.grad_accum_steps) * config.epochs)
    warmup_steps = int(config.warmup_fraction * total_steps)

    def lr_factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    model, optimizer, loader, scheduler = accelerator.prepare(model, optimizer, loader, scheduler)
    my_steps = max(1, math.ceil(len(loader) / config.grad_accum_steps) * config.epochs)  # this process's share
    trainable = [p for p in model.parameters() if p.requires_grad]
    n_trainable = sum(p.numel() for p in trainable)
    counts = {**data.counts(), "eval_pairs": eval_data.counts()["pairs"], "eval_thumbs": len(eval_data.thumbs)}
    log.info("reward model: %s train, %s held out; %.2fM trainable parameters; %d steps",
             data.counts(), eval_data.counts(), n_trainable / 1e6, my_steps)

    metrics: dict = {"counts": counts, "trainable_parameters": n_trainable, "steps": my_steps,
                     "warm_started_from": str(init_from) if init_from else None}
    if config.eval_at_start and (eval_groups or eval_thumbs):
        metrics["eval_before"] = evaluate(model, eval_groups, eval_thumbs, config.eval_batch_size, pad_id, accelerator)
        log.info("held-out before training: %s", metrics["eval_before"])

    # The loop. Units: loss in nats per item; pairs/s counts pairs this process trained on.
    # CPU seconds are counted too: on a shared machine they, not wall time, measure the cost.
    step, seen_pairs, train_seconds, eval_seconds, train_cpu_seconds = 0, 0, 0.0, 0.0, 0.0
    epoch_history = []
    progress = tqdm(total=my_steps, desc="reward model", disable=not accelerator.is_local_main_process, dynamic_ncols=True)
    for epoch in range(config.epochs):
        window, whole_epoch = _running_totals(), _running_totals()  # window: since the last log line
        tick, cpu_tick = time.perf_counter(), time.process_time()
        for batch in loader:
            with accelerator.accumulate(model):
                scores = model(batch["input_ids"], batch["attention_mask"], batch["answer_mask"])
                loss, stats = preference_loss(scores, batch, config.thumb_weight, config.center_coef, config.tie_weight)
                accelerator.backward(loss)
                if accelerator.sync_gradients and config.max_grad_norm:
                    accelerator.clip_grad_norm_(trainable, config.max_grad_norm)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad()
            for totals in (window, whole_epoch):
                totals["loss"] += loss.item()
                totals["batches"] += 1
                totals["pairs"] += stats["pairs"]
                totals["correct"] += stats["pairs_correct"]
            seen_pairs += stats["pairs"]
            if not accelerator.sync_gradients:
                continue
            step += 1
            progress.update(1)
            now = time.perf_counter()
            pairs_per_s = seen_pairs / (train_seconds + now - tick)
            progress.set_postfix(loss=f"{loss.item():.3f}", pairs_s=f"{pairs_per_s:.2f}")
            if step % config.log_every == 0 or step == my_steps:
                log.info("step %d/%d epoch %d: loss %.4f, train accuracy %s, %.2f pairs/s, lr %.2e",
                         step, my_steps, epoch, window["loss"] / window["batches"],
                         f"{window['correct'] / window['pairs']:.3f}" if window["pairs"] else "-",
                         pairs_per_s, scheduler.get_last_lr()[0])
                window = _running_totals()
        train_seconds += time.perf_counter() - tick
        train_cpu_seconds += time.process_time() - cpu_tick
        tick = time.perf_counter()
        held_out = evaluate(model, eval_groups, eval_thumbs, config.eval_batch_size, pad_id, accelerator)
        eval_seconds += time.perf_counter() - tick
        epoch_history.append({
            "epoch": epoch,
            "train_loss": whole_epoch["loss"] / max(1, whole_epoch["batches"]),
            "train_accuracy": whole_epoch["correct"] / whole_epoch["pairs"] if whole_epoch["pairs"] else None,
            "eval": held_out,
        })
        log.info("epoch %d: train loss %.4f, held-out accuracy %s on %d pairs (95%% interval %s)", epoch,
                 epoch_history[-1]["train_loss"], held_out["accuracy"], held_out["pairs"],
                 held_out["accuracy_interval"])
    progress.close()

    # Held-out numbers for the final weights (the last epoch's, or a first look with 0 epochs).
    final = epoch_history[-1]["eval"] if epoch_history else evaluate(
        model, eval_groups, eval_thumbs, config.eval_batch_size, pad_id, accelerator)

    # Normalise on the serving policy's answers (or a sample of training answers), then save.
    unwrapped: RewardModel = accelerator.unwrap_model(model)
    reference = list(reference) if reference is not None else data.conversations()
    if len(reference) > config.normalization_samples:
        reference = random.Random(config.seed).sample(reference, config.normalization_samples)
    normalization = unwrapped.fit_normalization(reference)
    seen = accelerator.reduce(torch.tensor(float(seen_pairs), device=accelerator.device), reduction="sum").item()
    metrics.update({
        "eval_accuracy": final["accuracy"],
        "eval_pairs": final["pairs"],
        "eval_accuracy_interval": final["accuracy_interval"],
        "eval_thumb_accuracy": final["thumb_accuracy"],
        "eval": final,
        "epochs": epoch_history,
        "pairs_per_second": seen / train_seconds if train_seconds else None,
        "train_seconds": train_seconds,
        "train_cpu_seconds": train_cpu_seconds,
        "pairs_per_cpu_second": seen / train_cpu_seconds if train_cpu_seconds else None,
        "eval_seconds": eval_seconds,
        "normalization": normalization,
        "seconds": time.perf_counter() - started,
    })
    if accelerator.is_main_process:
        save_reward_model(unwrapped, out_dir, metrics)
        log.info("saved reward model to %s: held-out accuracy %s", out_dir, metrics["eval_accuracy"])
    accelerator.wait_for_everyone()
    return metrics


# -- command line: train from a JSONL export (TRL's preference format) ---------------------------

def _text(value) -> str:
    """TRL's conversational format gives an answer as [{"role": "assistant", "content": ...}]."""
    if isinstance(value, str):
        return value
    return "".join(turn["content"] for turn in value)


def _prompt(value) -> list[Message]:
    return [{"role": "user", "content": value}] if isinstance(value, str) else [dict(turn) for turn in value]


def read_preference_jsonl(path: str | os.PathLike) -> RewardData:
    """Rows {"prompt", "chosen", "rejected"} become comparison groups (rows sharing a prompt form
    one group); rows {"prompt", "completion", "label": bool} (TRL's unpaired format) become thumbs."""
    groups: dict[str, tuple[list[Message], list[PreferencePair]]] = {}
    thumbs = []
    with open(path, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            prompt = _prompt(row["prompt"])
            if "chosen" in row:
                key = json.dumps(prompt, sort_keys=True)
                groups.setdefault(key, (prompt, []))[1].append(PreferencePair(_text(row["chosen"]), _text(row["rejected"]), f"line {number}"))
            elif "completion" in row:
                thumbs.append(ThumbLabel(prompt, _text(row["completion"]), 1 if row["label"] else -1, f"line {number}"))
            else:
                raise ValueError(f"{path}:{number}: expected chosen/rejected or completion/label")
    return RewardData([ComparisonGroup(p, pairs) for p, pairs in groups.values()], thumbs)


def config_arguments(parser: argparse.ArgumentParser) -> None:
    """One --flag per RewardConfig field, with its help text."""
    for f in dataclasses.fields(RewardConfig):
        flag = "--" + f.name.replace("_", "-")
        default = f.default
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f.metadata["help"])
        elif f.name in ("num_layers", "trainable_layers"):
            parser.add_argument(flag, type=int, default=default, help=f.metadata["help"])
        else:
            parser.add_argument(flag, type=type(default), default=default, help=f.metadata["help"])


def config_from_arguments(args: argparse.Namespace) -> RewardConfig:
    return RewardConfig(**{f.name: getattr(args, f.name) for f in dataclasses.fields(RewardConfig)})


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Train a reward model from a preference JSONL file.")
    parser.add_argument("--data", required=True, help="JSONL: prompt/chosen/rejected rows, and prompt/completion/label rows.")
    parser.add_argument("--eval-data", help="JSONL held out for accuracy (default: held_out_percent of the prompts).")
    parser.add_argument("--out", required=True, help="Directory to write the reward model to.")
    parser.add_argument("--init-from", help="A previous reward model directory to warm-start from.")
    config_arguments(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    eval_data = read_preference_jsonl(args.eval_data) if args.eval_data else None
    metrics = train_reward_model(read_preference_jsonl(args.data), config_from_arguments(args), args.out,
                                 eval_data=eval_data, init_from=args.init_from)
    print(json.dumps({k: metrics[k] for k in ("eval_accuracy", "pairs_per_second", "train_seconds", "counts")}, indent=2))


if __name__ == "__main__":
    main()
