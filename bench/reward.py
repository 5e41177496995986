"""Reward models on real human preferences: ours against TRL's RewardTrainer.

    nice -n 10 .venv/bin/python bench/reward.py --threads 1 --json reward.json     # both, full data
    .venv/bin/python bench/reward.py --skip-trl --train-pairs 40 --eval-pairs 40    # a speed probe

Each side takes ~27 CPU-minutes with the defaults below (about an hour for both on an idle
2-core machine at 1 thread; several hours when the machine is shared).

Data: ../shared/data/hh-rlhf/harmless-base-test.jsonl.gz (Anthropic HH-RLHF, harmless-base test
split). Line i with i % 5 == 0 is evaluation (463 pairs), the rest training (1,849 pairs). Each
line is a whole dialogue twice, differing only in the last assistant turn; it is parsed into
chat messages (the shared part) and the two final answers.

Both trainers get the same backbone (cut to the same depth), the same token ids (our chat-template
rendering, cut from the left to max_tokens), the same LoRA layers and rank, learning rate,
schedule, batch size, epochs and length-grouped batching. Differences that are each side's design:
TRL reads the score at the last token that is not the pad id (SmolLM2's pad is <|im_end|>, so one
token before ours), trains its head at the body's learning rate, initialises it randomly, and
centres rewards per pair (mean((r_c + r_r)^2), same coefficient) where we centre the batch mean.
Both are evaluated on the same evaluation pairs; "shorter final answer wins" is the bar to beat.
"""

from __future__ import annotations

import argparse
import gzip
import json
import logging
import os
import re
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from retrain.reward import RewardConfig, config_arguments, config_from_arguments, train_reward_model  # noqa: E402
from retrain.reward_data import ComparisonGroup, Message, PreferencePair, RewardData, encode_conversation  # noqa: E402

log = logging.getLogger("bench.reward")

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"

# The budget chosen for a busy 2-core CPU, measured in CPU seconds on 40-pair probes (1 thread):
#   30 blocks, LoRA on the top 4      0.85 pairs per CPU-second (every pass still runs 30 blocks)
#   12 blocks, LoRA on the top 4      1.55
#   12 blocks, LoRA on all 12         1.07   <- chosen: ~29 CPU-minutes for 1,849 pairs + eval
#   30 blocks, LoRA on all 30         ~0.43  (estimated: the 12-block rate x 12/30; over an hour)
# The last 128 tokens keep the final user turn and the answer for ~85% of pairs; one epoch.
BENCH_DEFAULTS = dict(
    num_layers=12, lora_rank=16, lora_alpha=32.0, trainable_layers=None, max_tokens=128, epochs=1, batch_size=8,
    learning_rate=5e-4, head_learning_rate=1e-3, eval_batch_size=32, normalization_samples=64, log_every=20,
)


# -- HH-RLHF -----------------------------------------------------------------------------------

TURN = re.compile(r"\n\n(Human|Assistant):")
ASSISTANT = "\n\nAssistant:"


def parse_dialogue(text: str) -> list[Message]:
    """'\\n\\nHuman: ...\\n\\nAssistant: ...' -> chat turns."""
    parts = TURN.split(text)
    return [
        {"role": "user" if parts[i] == "Human" else "assistant", "content": parts[i + 1].strip()}
        for i in range(1, len(parts), 2)
    ]


def split_pair(chosen: str, rejected: str) -> tuple[list[Message], str, str]:
    """(shared prompt turns, chosen final answer, rejected final answer).

    The answers start after the last 'Assistant:' marker the two texts share; anything after
    it (a few answers themselves contain 'Human:' or 'Assistant:') belongs to the answer."""
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(ASSISTANT)
    if cut < 0:
        raise ValueError("the two dialogues share no assistant turn")
    start = cut + len(ASSISTANT)
    return parse_dialogue(chosen[:cut]), chosen[start:].strip(), rejected[start:].strip()


def load_hh(path: Path) -> tuple[RewardData, RewardData]:
    """(training, evaluation) by the README's rule: line i % 5 == 0 is evaluation. Each line is
    one labeller's judgement, so each is a group of its own."""
    train, evaluation = RewardData(), RewardData()
    with gzip.open(path, "rt", encoding="utf-8") as lines:
        for i, line in enumerate(lines):
            row = json.loads(line)
            prompt, chosen, rejected = split_pair(row["chosen"], row["rejected"])
            group = ComparisonGroup(prompt, [PreferencePair(chosen, rejected, f"line {i}")], f"line {i}")
            (evaluation if i % 5 == 0 else train).groups.append(group)
    return train, evaluation


def shorter_wins(data: RewardData) -> float:
    """Accuracy of 'the shorter final answer (in characters) is the better one'. Ties (2 of the
    463 evaluation pairs) count as wrong, as in the data's README (0.592)."""
    pairs = [pair for group in data.groups for pair in group.pairs]
    return sum(len(pair.chosen) < len(pair.rejected) for pair in pairs) / len(pairs)


# -- TRL's RewardTrainer on the same budget ----------------------------------------------------

def token_pairs(tokenizer, data: RewardData, max_tokens: int) -> dict[str, list]:
    chosen, rejected = [], []
    for group in data.groups:
        for pair in group.pairs:
            chosen.append(encode_conversation(tokenizer, group.prompt, pair.chosen, max_tokens))
            rejected.append(encode_conversation(tokenizer, group.prompt, pair.rejected, max_tokens))
    return {"chosen_ids": chosen, "rejected_ids": rejected}


@torch.no_grad()
def pairwise_accuracy(model, pairs: dict[str, list], pad_id: int, batch_size: int) -> float:
    """Held-out accuracy of a sequence-classification model (its own pooling), ties half."""
    model.eval()
    sequences = pairs["chosen_ids"] + pairs["rejected_ids"]
    order = sorted(range(len(sequences)), key=lambda i: len(sequences[i]))
    scores = torch.empty(len(sequences))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(sequences[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(sequences[i])] = torch.tensor(sequences[i])
            mask[j, : len(sequences[i])] = 1
        scores[rows] = model(input_ids=ids, attention_mask=mask).logits.squeeze(-1).float()
    n = len(pairs["chosen_ids"])
    margins = scores[:n] - scores[n:]
    return float(((margins > 0).float() + 0.5 * (margins == 0).float()).mean())


def run_trl(train: RewardData, evaluation: RewardData, config: RewardConfig, work_dir: Path) -> dict:
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer
    from trl import RewardConfig as TRLRewardConfig
    from trl import RewardTrainer

    tokenizer = AutoTokenizer.from_pretrained(config.base_model)
    depth = AutoConfig.from_pretrained(config.base_model).num_hidden_layers
    overrides = {"num_hidden_layers": config.num_layers} if config.num_layers and config.num_layers < depth else {}
    model = AutoModelForSequenceClassification.from_pretrained(config.base_model, num_labels=1, dtype=torch.float32, **overrides)
    model.config.pad_token_id = tokenizer.pad_token_id
    n_layers = model.config.num_hidden_layers
    top = list(range(n_layers - (config.trainable_layers or n_layers), n_layers))
    peft_config = None
    if config.lora_rank > 0:
        body_linears = sorted({name.rsplit(".", 1)[-1] for name, module in model.model.named_modules()
                               if isinstance(module, torch.nn.Linear)})
        peft_config = LoraConfig(
            task_type="SEQ_CLS", r=config.lora_rank, lora_alpha=config.lora_alpha, lora_dropout=0.0,
            target_modules=body_linears, modules_to_save=["score"], layers_to_transform=top, layers_pattern="layers",
        )
    else:
        for name, param in model.named_parameters():
            param.requires_grad_(config.trainable_layers is None or name.startswith("score")
                                 or any(f"layers.{i}." in name for i in top) or name.startswith("model.norm."))

    train_pairs = token_pairs(tokenizer, train, config.max_tokens)
    train_pairs["length"] = [len(c) + len(r) for c, r in zip(train_pairs["chosen_ids"], train_pairs["rejected_ids"])]
    args = TRLRewardConfig(
        output_dir=str(work_dir / "trl"), num_train_epochs=config.epochs, per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accum_steps, learning_rate=config.learning_rate, lr_scheduler_type="linear",
        warmup_steps=config.warmup_fraction, weight_decay=config.weight_decay, max_grad_norm=config.max_grad_norm,
        max_length=None, center_rewards_coefficient=config.center_coef or None,
        train_sampling_strategy="group_by_length", remove_unused_columns=False,  # keep "length" for the sampler
        gradient_checkpointing=False, bf16=False, report_to="none", save_strategy="no", eval_strategy="no",
        logging_steps=config.log_every, seed=config.seed, dataloader_num_workers=0,
    )
    trainer = RewardTrainer(model=model, args=args, train_dataset=Dataset.from_dict(train_pairs),
                            processing_class=tokenizer, peft_config=peft_config)
    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    cpu_started = time.process_time()
    output = trainer.train()
    cpu_seconds = time.process_time() - cpu_started
    seconds = output.metrics["train_runtime"]
    accuracy = pairwise_accuracy(trainer.model, token_pairs(tokenizer, evaluation, config.max_tokens),
                                 tokenizer.pad_token_id, config.eval_batch_size)
    n_pairs = len(train_pairs["chosen_ids"])
    return {
        "eval_accuracy": accuracy,
        "pairs_per_second": n_pairs * config.epochs / seconds if seconds else None,
        "train_seconds": seconds,
        "train_cpu_seconds": cpu_seconds,
        "pairs_per_cpu_second": n_pairs * config.epochs / cpu_seconds if cpu_seconds else None,
        "train_loss": output.metrics.get("train_loss"),
        "trainable_parameters": trainable,
    }


# -- the run -----------------------------------------------------------------------------------

def default_base_model() -> str:
    """The project's base model (MODEL, or SmolLM2 converted once under DATA_DIR)."""
    from deploy.base_model import ModelSettings, resolve_from_settings

    return str(resolve_from_settings(ModelSettings()))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="HH-RLHF jsonl.gz file.")
    parser.add_argument("--train-pairs", type=int, help="Use only the first N training pairs (speed probes).")
    parser.add_argument("--eval-pairs", type=int, help="Use only the first N evaluation pairs (speed probes).")
    parser.add_argument("--skip-trl", action="store_true", help="Train only our reward model.")
    parser.add_argument("--skip-ours", action="store_true", help="Train only TRL's.")
    parser.add_argument("--json", type=Path, help="Write the results here as JSON.")
    parser.add_argument("--work-dir", type=Path, help="Keep the trained models here (default: a temporary directory).")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice). On a shared, busy "
                        "machine 1 thread wastes less time waiting for a descheduled partner thread.")
    config_arguments(parser)
    parser.set_defaults(**BENCH_DEFAULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)

    config = config_from_arguments(args)
    config.base_model = config.base_model or default_base_model()
    train, evaluation = load_hh(args.data)
    train.groups = train.groups[: args.train_pairs]
    evaluation.groups = evaluation.groups[: args.eval_pairs]
    results: dict = {
        "data": {"file": str(args.data), "train_pairs": len(train.groups), "eval_pairs": len(evaluation.groups)},
        "baseline_shorter_wins": shorter_wins(evaluation),
        "config": asdict(config),
        "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__},
    }
    log.info("HH-RLHF: %d training pairs, %d evaluation pairs; shorter-wins %.3f",
             len(train.groups), len(evaluation.groups), results["baseline_shorter_wins"])

    with tempfile.TemporaryDirectory(prefix="bench-reward-") as scratch:
        work_dir = args.work_dir or Path(scratch)
        if not args.skip_ours:
            started = time.perf_counter()
            ours = train_reward_model(train, config, work_dir / "ours", eval_data=evaluation)
            results["ours"] = {
                "eval_accuracy": ours["eval_accuracy"], "pairs_per_second": ours["pairs_per_second"],
                "train_seconds": ours["train_seconds"], "train_cpu_seconds": ours["train_cpu_seconds"],
                "pairs_per_cpu_second": ours["pairs_per_cpu_second"], "eval_seconds": ours["eval_seconds"], "total_seconds": time.perf_counter() - started,
                "train_loss": ours["epochs"][-1]["train_loss"] if ours["epochs"] else None,
                "trainable_parameters": ours["trainable_parameters"],
            }
        if not args.skip_trl:
            started = time.perf_counter()
            results["trl"] = {**run_trl(train, evaluation, config, work_dir), "total_seconds": time.perf_counter() - started}

    print(f"\nHH-RLHF harmless-base: {len(train.groups)} training pairs, {len(evaluation.groups)} evaluation pairs")
    print(f"{'':24}{'eval accuracy':>15}{'pairs/s':>10}{'pairs/CPU-s':>13}{'train s':>10}{'train CPU-s':>13}")
    print(f"{'shorter answer wins':24}{results['baseline_shorter_wins']:>15.3f}")
    for name, key in (("ours (retrain.reward)", "ours"), ("TRL RewardTrainer", "trl")):
        if key in results:
            r = results[key]
            print(f"{name:24}{r['eval_accuracy']:>15.3f}{r['pairs_per_second']:>10.2f}{r['pairs_per_cpu_second']:>13.2f}"
                  f"{r['train_seconds']:>10.0f}{r['train_cpu_seconds']:>13.0f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
