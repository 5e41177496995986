"""Retraining's settings (environment variables) and the full config of a round (dataclasses).

Two layers, on purpose:

- `RetrainSettings` is what an operator sets: when rounds run (RETRAIN_INTERVAL_MINUTES,
  RETRAIN_CRON, RETRAIN_MIN_NEW_FEEDBACK), whether a passing candidate is promoted
  (AUTO_PROMOTE), and the budgets that decide how long a round takes (prompts, PPO iterations,
  reward epochs, answer length). Every field is an environment variable of the same name in
  upper case, read the same way by every `python -m ...` command.
- `RetrainConfig` is everything a round does, as dataclasses with help text: the round's own
  `RoundConfig`, the reward model's `RewardConfig`, the demonstrations' `SFTConfig`, PPO's
  `PPOConfig` and the gate's `GateConfig`. It is built from the settings and travels, whole, inside every checkpoint's
  manifest, so a candidate says exactly how it was made (nanoGPT's habit).

Any field of the config can be set from a JSON file named by RETRAIN_CONFIG_FILE, e.g.
`{"ppo": {"kl_coef": 0.1}, "gate": {"max_kl": 4}}`; the file wins over the budget variables.
`python -m retrain config` prints the effective config with every field's help.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from deploy.base_model import ModelSettings

from .gate import GateConfig
from .ppo import PPOConfig
from .reward import RewardConfig
from .kto import KTOConfig
from .sft import SFTConfig


@dataclass
class RoundConfig:
    """What the round itself decides: how much data is enough, how it is split, what is kept."""

    min_pairs: int = field(
        default=8,
        metadata={"help": "Fewest preference pairs (comparisons and opposite thumbs, training "
                          "side) for a round to run; fewer: the round is skipped."},
    )
    min_prompts: int = field(
        default=8, metadata={"help": "Fewest logged prompts for PPO (training side) for a round to run."}
    )
    min_gate_prompts: int = field(
        default=4, metadata={"help": "Fewest held-out prompts for the gate to judge on."}
    )
    held_out_percent: float = field(
        default=20.0,
        metadata={"help": "Percent of prompts held out (a stable split by a hash of the prompt "
                          "text): never in PPO or reward training; the gate judges on them and "
                          "the reward model's accuracy is measured on their comparisons."},
    )
    max_ppo_prompts: int = field(
        default=512,
        metadata={"help": "Most logged prompts read for PPO (a uniform sample: the store "
                          "returns prompts in a hash order)."},
    )
    max_gate_prompts: int = field(
        default=48,
        metadata={"help": "Most held-out prompts the gate generates answers for. The gate's 90% "
                          "bound clears 0.5 from a win rate of 0.69 on 16 prompts, 0.59 on 48."},
    )
    max_reward_examples: int | None = field(
        default=512,
        metadata={"help": "Most comparison groups + thumbs the reward model trains on per round "
                          "(a fresh uniform sample each round; None: all). Bounds the round's "
                          "time as feedback piles up; the warm start carries earlier rounds'."},
    )
    gate_max_new_tokens: int = field(
        default=64,
        metadata={"help": "Answer length cap of the gate's greedy answers (candidate and serving "
                          "alike); an answer reaching it without EOS counts as cut off."},
    )
    gate_batch_size: int = field(default=8, metadata={"help": "Prompts per generate() call in the gate."})
    auto_promote: bool = field(
        default=True,
        metadata={"help": "Promote a candidate that passes the gate (never while pinned)."},
    )
    keep_reward_models: int = field(
        default=2,
        metadata={"help": "Reward model directories kept under DATA_DIR/reward (the newest is "
                          "the next round's warm start)."},
    )
    seed: int = field(
        default=0,
        metadata={"help": "Seed of the run: each round's seed is derived from it and the round's run id "
                          "(retrain.round.round_seed) and seeds the reward model, PPO and the data samples."},
    )


@dataclass
class RetrainConfig:
    round: RoundConfig = field(default_factory=RoundConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    kto: KTOConfig = field(default_factory=KTOConfig)
    ppo: PPOConfig = field(default_factory=PPOConfig)
    gate: GateConfig = field(default_factory=GateConfig)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> list[tuple[str, Any, str]]:
        """(section.field, value, help) for every field: what `python -m retrain config` prints."""
        rows = []
        for section in dataclasses.fields(self):
            part = getattr(self, section.name)
            for f in dataclasses.fields(part):
                rows.append((f"{section.name}.{f.name}", getattr(part, f.name), f.metadata.get("help", "")))
        return rows


def apply_overrides(config: RetrainConfig, overrides: dict[str, Any]) -> RetrainConfig:
    """Set fields from {"section": {"field": value}}; unknown names are an error, not ignored."""
    sections = {f.name: f for f in dataclasses.fields(config)}
    for section, values in overrides.items():
        if section not in sections or not isinstance(values, dict):
            raise ValueError(f"unknown config section {section!r}: expected one of {', '.join(sections)}")
        part = getattr(config, section)
        known = {f.name for f in dataclasses.fields(part)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown {section} fields {sorted(unknown)}: see `python -m retrain config`")
        # replace() re-runs __post_init__, so a bad combination is refused here, not mid-round.
        setattr(config, section, dataclasses.replace(part, **values))
    return config


class RetrainSettings(ModelSettings):
    """`python -m retrain once | serve | config`: the store's and the model's settings
    (DATA_DIR, DATABASE_URL, MODEL) plus the schedule, promotion and budgets."""

    # When rounds run (python -m retrain serve).
    retrain_interval_minutes: float | None = Field(
        None, gt=0, description="Run a round every this many minutes (unset: no clock)."
    )
    retrain_cron: str | None = Field(
        None, description="Run a round on this crontab line, UTC (e.g. '0 3 * * *'); wins over the interval."
    )
    retrain_min_new_feedback: int = Field(
        50, ge=0,
        description="Start a round once this many votes (thumbs and comparisons) arrived since the "
        "last round began (0: votes never start one; the clock or edits may).",
    )
    retrain_min_new_edits: int = Field(
        16, ge=0,
        description="Start a round once this many edited answers (demonstrations) arrived since the "
        "last round began, whatever the votes (0: edits never start one). An edit's own 'edit beats "
        "original' comparison counts here, not as a vote.",
    )
    retrain_feedback_check_seconds: float = Field(
        60.0, gt=0, description="How often the scheduler counts new feedback."
    )

    # What happens to a candidate.
    auto_promote: bool = Field(
        True, description="Promote a candidate that passes the gate (never while pinned)."
    )

    # Budgets: how long a round takes. These defaults are also the loop benchmark's (bench/loop.py,
    # profile `full`): every reported learning result uses them. (With the earlier defaults, 2 PPO
    # iterations of 8 answers, a round on SmolLM2-135M over 48 seeded conversations took 12.5 min
    # wall on a busy 2-core machine.)
    retrain_max_prompts: int = Field(
        256, gt=0, description="Most logged prompts PPO samples from (a uniform sample)."
    )
    retrain_max_gate_prompts: int = Field(
        48, gt=0, description="Most held-out prompts the gate answers and judges."
    )
    retrain_max_reward_examples: int | None = Field(
        512, gt=0, description="Most comparison groups + thumbs the reward model trains on per "
        "round (a fresh sample each round; unset: all)."
    )
    retrain_held_out_percent: float = Field(
        20.0, gt=0, lt=100, description="Percent of prompts held out for the gate and reward accuracy."
    )
    retrain_min_pairs: int = Field(8, ge=1, description="Fewest preference pairs for a round to run.")
    retrain_min_prompts: int = Field(8, ge=1, description="Fewest PPO prompts for a round to run.")
    retrain_ppo_iterations: int = Field(8, ge=1, description="PPO iterations per round.")
    # 32 answers and one optimiser step an iteration (TRL's GRPO/RLOO default: each sampled batch is
    # one on-policy step). With 16 answers in 4 steps of 8 (2 prompts a step, each batch used
    # twice), every round of the loop's simple runs and of their coin-toss controls alike spent its
    # KL budget after 4-6 iterations, at the same rate with or without a preference in the votes.
    retrain_ppo_batch_size: int = Field(
        32, ge=1, description="Answers per PPO iteration, per process: RETRAIN_PPO_BATCH_SIZE / "
        "RETRAIN_PPO_GROUP_SIZE prompts (a launch of N processes samples N times as many)."
    )
    retrain_ppo_mini_batch_size: int | None = Field(
        None, ge=1, description="Answers per optimiser step; RETRAIN_PPO_BATCH_SIZE must be a multiple "
        "of it. Unset: all of the iteration's answers, one step per epoch."
    )
    retrain_ppo_group_size: int = Field(
        4, ge=1, description="Answers sampled per prompt; rloo and grpo compare each with its siblings "
        "(need >= 2). RETRAIN_PPO_BATCH_SIZE must be a multiple of it."
    )
    retrain_advantage_estimator: Literal["rloo", "grpo", "gae"] = Field(
        "rloo", description="rloo: each answer's return minus its siblings' mean, on every token of "
        "the answer; grpo: normalised by the group's std too; gae: per-token GAE with a learnt critic "
        "(warmed up before the policy moves, kept in the checkpoint across rounds)."
    )
    retrain_ppo_epochs: int = Field(
        1, ge=1, description="PPO passes over each iteration's answers (the update's cost scales with it)."
    )
    retrain_max_new_tokens: int = Field(
        64, ge=1, description="Answer length cap of PPO rollouts and the gate, in tokens; an answer "
        "reaching it without EOS counts as cut off (PPO penalises it)."
    )
    retrain_reward_epochs: int = Field(2, ge=0, description="Reward model passes over its data per round.")
    retrain_reward_layers: int | None = Field(
        12, ge=1,
        description="The reward model keeps only the bottom N blocks of the base model (unset: all). "
        "Its cost is proportional to depth; a judge needs the middle layers' features most.",
    )
    retrain_reward_trainable_layers: int | None = Field(
        4, ge=1, description="Only the reward model's top N blocks learn (LoRA); unset: all of them."
    )
    retrain_reward_pooling: Literal["mean", "last"] = Field(
        "mean", description="What the reward model's head reads: the mean of the answer's own tokens' "
        "hidden states, or the state at its last token (a warm start keeps the previous model's).",
    )
    retrain_reward_max_tokens: int = Field(
        384, ge=16, description="Longest prompt + answer the reward model reads, in tokens."
    )
    retrain_sft: bool = Field(
        True, description="Fine-tune the policy on the training side's demonstrations (answers "
        "users edited into the ones they wanted) before PPO, each round that has any.",
    )
    retrain_sft_liked_answers: bool = Field(
        False, description="SFT also learns the training side's answers users gave a thumbs up (a policy's "
        "answers; one cut at the token limit is learnt without its end of turn). Off: one round of it on "
        "SmolLM2 cost 17.5 nats of KL for +0.05 thumbs up (README, Results).",
    )
    retrain_sft_epochs: int = Field(3, ge=1, description="SFT passes over the round's demonstrations and liked answers.")
    retrain_sft_learning_rate: float = Field(2e-4, gt=0, description="AdamW learning rate of the adapter during SFT.")
    retrain_sft_max_demonstrations: int | None = Field(
        256, ge=1, description="Most examples one round's SFT trains on: the newest demonstrations first, "
        "then the newest liked answers (unset: all)."
    )
    retrain_kto: bool = Field(
        False, description="Before PPO, learn the training side's thumbed answers with KTO (liked up, disliked "
        "down, relative to the base). Off until the loop has measured it (README, Results).",
    )
    retrain_kto_epochs: int = Field(1, ge=1, description="KTO passes over the round's thumbed answers.")
    retrain_kto_beta: float = Field(0.1, gt=0, description="KTO's beta: how far a log-ratio may go before its loss saturates.")
    retrain_threads: int | None = Field(
        1, ge=1,
        description="CPU threads torch uses in a round (unset: one per core). 1 by default: a "
        "round usually shares the machine with a server, and oversubscribed threads wait on each "
        "other (measured: greedy generation 6.5x slower with 2 threads than with 1 on a busy "
        "2-core machine). Raise it on a machine of the round's own.",
    )
    retrain_launcher: str | None = Field(
        None,
        description="Run each round (`once`, and every round `serve` starts) as processes of this "
        "launcher, which is given `-m retrain once ...`: e.g. 'accelerate launch --multi_gpu "
        "--num_processes 4' for data-parallel PPO and reward training on 4 GPUs. Unset: the round "
        "runs in the command's own process.",
    )
    retrain_config_file: Path | None = Field(
        None, description="JSON file setting any field of the full config (see `python -m retrain config`)."
    )

    @model_validator(mode="after")
    def _check(self) -> RetrainSettings:
        if self.retrain_ppo_batch_size % self.retrain_ppo_group_size:
            raise ValueError(f"RETRAIN_PPO_BATCH_SIZE={self.retrain_ppo_batch_size} must be a multiple of "
                             f"RETRAIN_PPO_GROUP_SIZE={self.retrain_ppo_group_size}")
        if self.retrain_ppo_mini_batch_size and self.retrain_ppo_batch_size % self.retrain_ppo_mini_batch_size:
            raise ValueError(f"RETRAIN_PPO_BATCH_SIZE={self.retrain_ppo_batch_size} must be a multiple of "
                             f"RETRAIN_PPO_MINI_BATCH_SIZE={self.retrain_ppo_mini_batch_size}")
        if self.retrain_advantage_estimator != "gae" and self.retrain_ppo_group_size < 2:
            raise ValueError(f"RETRAIN_ADVANTAGE_ESTIMATOR={self.retrain_advantage_estimator} compares an answer with "
                             "its siblings: RETRAIN_PPO_GROUP_SIZE must be >= 2 (or use gae)")
        if self.retrain_cron:
            from apscheduler.triggers.cron import CronTrigger

            try:
                CronTrigger.from_crontab(self.retrain_cron)
            except ValueError as exc:
                raise ValueError(f"RETRAIN_CRON={self.retrain_cron!r} is not a crontab line: {exc}") from None
        return self

    @property
    def reward_dir(self) -> Path:
        """Where reward models live between rounds (the newest is the next warm start)."""
        return Path(self.data_dir) / "reward"

    @property
    def checkpoints_dir(self) -> Path:
        """Where candidates are written (the same place deploy's settings name)."""
        return Path(self.data_dir) / "checkpoints"

    def retrain_config(self, base_model: str | Path = "") -> RetrainConfig:
        """The full config of a round on `base_model` (a local model directory)."""
        batch = self.retrain_ppo_batch_size
        config = RetrainConfig(
            round=RoundConfig(
                min_pairs=self.retrain_min_pairs,
                min_prompts=self.retrain_min_prompts,
                held_out_percent=self.retrain_held_out_percent,
                max_ppo_prompts=self.retrain_max_prompts,
                max_gate_prompts=self.retrain_max_gate_prompts,
                max_reward_examples=self.retrain_max_reward_examples,
                gate_max_new_tokens=self.retrain_max_new_tokens,
                auto_promote=self.auto_promote,
            ),
            reward=RewardConfig(
                base_model=str(base_model),
                epochs=self.retrain_reward_epochs,
                max_tokens=self.retrain_reward_max_tokens,
                held_out_percent=self.retrain_held_out_percent,
                num_layers=self.retrain_reward_layers,
                trainable_layers=self.retrain_reward_trainable_layers,
                pooling=self.retrain_reward_pooling,
                log_every=5,
            ),
            kto=KTOConfig(
                enabled=self.retrain_kto,
                epochs=self.retrain_kto_epochs,
                beta=self.retrain_kto_beta,
                max_tokens=self.retrain_reward_max_tokens,
            ),
            sft=SFTConfig(
                enabled=self.retrain_sft,
                liked_answers=self.retrain_sft_liked_answers,
                epochs=self.retrain_sft_epochs,
                learning_rate=self.retrain_sft_learning_rate,
                max_demonstrations=self.retrain_sft_max_demonstrations,
                max_tokens=self.retrain_reward_max_tokens,
            ),
            ppo=PPOConfig(
                num_iterations=self.retrain_ppo_iterations,
                ppo_epochs=self.retrain_ppo_epochs,
                batch_size=batch,
                group_size=self.retrain_ppo_group_size,
                advantage_estimator=self.retrain_advantage_estimator,
                mini_batch_size=self.retrain_ppo_mini_batch_size or batch,
                # 4 answers per forward pass: the same updates, half the peak memory of 8 (the
                # update's activations through 30 blocks dominate a round's ~7 GB at 8).
                micro_batch_size=min(4, batch),
                max_new_tokens=self.retrain_max_new_tokens,
                max_prompt_tokens=self.retrain_reward_max_tokens,
            ),
            gate=GateConfig(),
        )
        if self.retrain_config_file:
            apply_overrides(config, json.loads(Path(self.retrain_config_file).read_text()))
        return config
