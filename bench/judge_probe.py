"""How many of its users' votes the reward model needs to learn a preference, without the loop.

    .venv/bin/python bench/judge_probe.py --preference simple --conversations 24 96 288

A loop day (bench/loop.py) is 24 conversations, each two sampled answers to one training-side
prompt, their comparison and a thumb on each. This probe makes such conversations once, with
the base policy's own sampling (the loop users' temperature and answer cap), labels them by a
hidden preference (bench/preferences.py: the loop's simulated users, no noise unless asked),
and trains a fresh reward model with the shipped defaults (`python -m retrain config`'s
`reward.*`) on the first N conversations for each N asked. Every model is measured on the same
held-out conversations (the 40 held-out prompts of the loop, never trained on): pairwise
accuracy and thumb accuracy with their 95% Wilson intervals. So the judge's learning curve is
read off directly: how many days of votes before its held-out accuracy clears the gate's floor
(`gate.min_reward_accuracy`, 0.6), and whether it ever does for this preference and model.

The sampled answers are written to `--answers` (JSON) and read back from it when it exists, so
several preferences are probed on the very same answers (run one process per preference).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere


def sample_conversations(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int,
                         temperature: float, top_p: float) -> list[dict]:
    """Two sampled answers to each prompt (the loop's first answer and its regenerate), and
    whether each ended before the cap."""
    tokenizer.padding_side = "left"
    conversations = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 for p in chunk for _ in range(2)]
        encoded = tokenizer(texts, return_tensors="pt", padding=True)
        with torch.no_grad():
            out = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature,
                                 top_p=top_p, pad_token_id=tokenizer.pad_token_id)
        new = out[:, encoded["input_ids"].shape[1] :]
        answers = []
        for row in new.tolist():
            ended = tokenizer.eos_token_id in row
            answers.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "ended": ended})
        for i, prompt in enumerate(chunk):
            conversations.append({"prompt": prompt, "answers": answers[2 * i : 2 * i + 2]})
        logging.info("sampled %d/%d conversations", len(conversations), len(prompts))
    return conversations


def labelled(conversations: list[dict], preference, noise: float, seed: int):
    """The loop users' votes on each conversation: a comparison of the two answers ('same'
    included) and a thumb on each, a `noise` share of them coin tosses."""
    from bench.preferences import SimulatedUser
    from retrain.reward_data import ComparisonGroup, PreferencePair, RewardData, ThumbLabel

    user = SimulatedUser(preference, noise=noise, rng=random.Random(seed))
    data = RewardData()
    for conversation in conversations:
        prompt = [{"role": "user", "content": conversation["prompt"]}]
        first, second = (answer["text"] for answer in conversation["answers"])
        for text in (first, second):
            if text:
                data.thumbs.append(ThumbLabel(prompt, text, user.thumb(text)))
        if first and second and first != second:
            verdict = user.compare(second, first)
            if verdict == "same":
                pair = PreferencePair(second, first, tie=True)
            else:
                pair = PreferencePair(*((second, first) if verdict == "better" else (first, second)))
            data.groups.append(ComparisonGroup(prompt, [pair]))
    return data


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from bench.loop import USER_SAMPLING, load_prompts, split_prompts
    from bench.preferences import PREFERENCES
    from deploy.base_model import resolve_base_model
    from retrain.reward import train_reward_model
    from retrain.settings import RetrainSettings

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default="simple")
    parser.add_argument("--conversations", type=int, nargs="+", default=[24, 96, 288],
                        help="training conversations per model (each a fresh model on the first N)")
    parser.add_argument("--held-out-conversations", type=int, default=80, help="on the 40 held-out prompts, in turn")
    parser.add_argument("--noise", type=float, default=0.0, help="share of votes that are coin tosses")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="the answer cap (the loop's: 128)")
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate() call")
    parser.add_argument("--answers", default="bench/out/judge-probe-answers.json", help="sampled answers: read if it exists, else written")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=None, help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default="var")
    parser.add_argument("--out", default=None, help="write the numbers as JSON here")
    args = parser.parse_args(argv)
    if any(n < 1 for n in args.conversations) or args.held_out_conversations < 1:
        parser.error("conversation counts must be >= 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    model_dir = resolve_base_model(args.model, Path(args.data_dir))
    training, held_out = split_prompts(load_prompts(), 40)
    rng = random.Random(args.seed)
    needed = max(args.conversations)
    answers_path = Path(args.answers)
    sampled = json.loads(answers_path.read_text()) if answers_path.exists() else None
    if sampled is None or len(sampled["training"]) < needed or len(sampled["held_out"]) < args.held_out_conversations \
            or sampled["max_new_tokens"] != args.max_new_tokens or sampled["model"] != str(model_dir):
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        policy = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        # The loop's users pick training-side prompts at random, so prompts repeat across days.
        train_prompts = [rng.choice(training) for _ in range(needed)]
        eval_prompts = [held_out[i % len(held_out)] for i in range(args.held_out_conversations)]
        sample = lambda prompts: sample_conversations(  # noqa: E731
            policy, tokenizer, prompts, args.max_new_tokens, args.batch_size, USER_SAMPLING["temperature"], USER_SAMPLING["top_p"])
        started = time.perf_counter()
        sampled = {"model": str(model_dir), "max_new_tokens": args.max_new_tokens, **USER_SAMPLING,
                   "training": sample(train_prompts), "held_out": sample(eval_prompts),
                   "seconds": time.perf_counter() - started}
        answers_path.parent.mkdir(parents=True, exist_ok=True)
        answers_path.write_text(json.dumps(sampled, indent=1))
        del policy

    preference = PREFERENCES[args.preference]
    everything = sampled["training"] + sampled["held_out"]
    all_answers = [a for c in everything for a in c["answers"]]
    eval_data = labelled(sampled["held_out"][: args.held_out_conversations], preference, args.noise, args.seed + 1)
    config = RetrainSettings(_env_file=None, model=str(model_dir)).retrain_config(model_dir).reward
    report = {
        "preference": preference.name, "noise": args.noise, "model": str(model_dir),
        "reward_config": {k: v for k, v in vars(config).items()},
        "answers": {"file": str(answers_path), "max_new_tokens": sampled["max_new_tokens"],
                    "ended_before_cap": sum(a["ended"] for a in all_answers) / len(all_answers),
                    "thumbs_up_rate": sum(preference.likes(a["text"]) for a in all_answers) / len(all_answers)},
        # A judge that calls every answer the majority's thumb scores this on the held-out thumbs.
        "held_out": eval_data.counts() | {"thumbs_up_share": sum(t.label > 0 for t in eval_data.thumbs) / max(1, len(eval_data.thumbs))},
        "runs": [],
    }
    for n in sorted(args.conversations):
        data = labelled(sampled["training"][:n], preference, args.noise, args.seed)
        started = time.perf_counter()
        with tempfile.TemporaryDirectory() as out_dir:
            metrics = train_reward_model(data, config, out_dir, eval_data=eval_data)
        run = {"conversations": n, "training": data.counts(), "seconds": round(time.perf_counter() - started, 1),
               "held_out": {k: metrics["eval"].get(k) for k in ("accuracy", "pairs", "accuracy_interval", "thumb_accuracy",
                                                                 "thumbs", "thumb_accuracy_interval")}}
        report["runs"].append(run)
        print(json.dumps(run), flush=True)
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
