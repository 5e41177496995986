"""Advantage estimators on SmolLM2: the same PPO budget against the same reward, one per estimator.

    nice .venv/bin/python bench/estimators.py --preference simple --estimators rloo gae --iterations 4

What it isolates: how a sequence's score reaches its tokens. The reward is the hidden preference
itself (bench/preferences.py: the users' rule, no reward model, no noise), so nothing differs
between the runs but `advantage_estimator`: each starts from the base with a fresh LoRA
adapter, the same seed, the same training prompts (the loop's training side of
bench/data/everyday_prompts.txt), the same number of sampled answers and the shipped PPO
config otherwise (`python -m retrain config`). GAE's critic starts at zero and is warmed up on
the first batch, which is what a round gets in the loop (its reward model is shallower than the
policy, so the reward head cannot seed the critic). Then greedy answers to the held-out prompts
(the gate's decoding): the preference's mean score, thumbs-up rate, win rate against the base's
answers to the same prompts (ties half), KL to the base (exact, as the gate measures it), words,
and the share of answers that end before the cap.

It is a short probe, not the loop: a handful of iterations on one seed. It writes a JSON report
(--out) and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from bench.loop import load_prompts, split_prompts  # noqa: E402
from bench.preferences import PREFERENCES, Preference, win_rate, words  # noqa: E402

log = logging.getLogger("bench.estimators")


def preference_reward(preference: Preference):
    """PPO's reward_fn: the preference's score; an answer it scores -inf (empty) gets one
    point below the batch's worst finite score, so normalisation stays finite."""

    def reward(prompts, answers) -> torch.Tensor:
        scores = [preference.score(a) for a in answers]
        finite = [s for s in scores if math.isfinite(s)]
        floor = (min(finite) if finite else 0.0) - 1.0
        return torch.tensor([s if math.isfinite(s) else floor for s in scores], dtype=torch.float32)

    return reward


def measure(preference: Preference, texts: list[str], ended: list[bool], baseline: list[str] | None) -> dict:
    scores = [preference.score(t) for t in texts]
    finite = [s for s in scores if math.isfinite(s)]
    return {
        "score": statistics.fmean(finite) if finite else None,
        "thumbs_up_rate": sum(map(preference.likes, texts)) / len(texts),
        "win_rate_vs_base": win_rate(preference, texts, baseline) if baseline else 0.5,
        "mean_words": statistics.fmean(words(t) for t in texts),
        "ended_before_cap": sum(ended) / len(ended),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default="simple")
    parser.add_argument("--estimators", nargs="+", choices=["rloo", "grpo", "gae"], default=["rloo", "gae"])
    parser.add_argument("--iterations", type=int, default=4, help="PPO iterations per estimator")
    parser.add_argument("--batch-size", type=int, default=16, help="answers per iteration")
    parser.add_argument("--max-new-tokens", type=int, default=64, help="answer cap, rollouts and measurement")
    parser.add_argument("--held-out", type=int, default=24, help="held-out prompts measured")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "var"))
    parser.add_argument("--out", default=None, help="JSON report path")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)

    from deploy.base_model import resolve_base_model
    from deploy.policy import load_base_policy
    from retrain.ppo import tokenize_prompts, train_ppo
    from retrain.round import greedy_answers, kl_to_reference
    from retrain.settings import RetrainSettings

    model_dir = resolve_base_model(args.model, Path(args.data_dir))
    preference = PREFERENCES[args.preference]
    training, held_out = split_prompts(load_prompts(), args.held_out)
    config = RetrainSettings(model=str(model_dir), retrain_max_new_tokens=args.max_new_tokens,
                             retrain_ppo_iterations=args.iterations, retrain_ppo_batch_size=args.batch_size,
                             retrain_config_file=None).retrain_config(model_dir)
    config.round = replace(config.round, gate_max_new_tokens=args.max_new_tokens)
    as_chat = [[{"role": "user", "content": p}] for p in held_out]
    report = {"preference": preference.name, "settings": vars(args), "runs": {}}

    def answers_of(model, tokenizer, label: str):
        _, tokens = tokenize_prompts(tokenizer, as_chat, config.ppo.max_prompt_tokens)
        return greedy_answers(model, tokenizer, tokens, config, label)

    base = load_base_policy(model_dir)
    started = time.perf_counter()
    base_answers = answers_of(base.model, base.tokenizer, "base answers")
    report["base"] = measure(preference, base_answers.texts, base_answers.ended_with_eos, None)
    report["base"]["seconds"] = time.perf_counter() - started
    log.info("base: %s", report["base"])

    for estimator in args.estimators:
        policy = load_base_policy(model_dir)
        ppo = replace(config.ppo, advantage_estimator=estimator, seed=args.seed)
        started = time.perf_counter()
        result = train_ppo(policy.model, policy.tokenizer, [[{"role": "user", "content": p}] for p in training],
                           preference_reward(preference), ppo)
        trained = time.perf_counter() - started
        answers = answers_of(result.model, policy.tokenizer, f"{estimator} answers")
        kl = kl_to_reference(result.model, None, answers, ppo.temperature)
        run = measure(preference, answers.texts, answers.ended_with_eos, base_answers.texts)
        run |= {"kl_to_base": sum(kl) / len(kl), "train_seconds": trained,
                "seconds": time.perf_counter() - started,
                "iterations": [{k: v for k, v in s.items() if isinstance(v, (int, float))} for s in result.stats],
                "examples": [{"prompt": p, "answer": a} for p, a in list(zip(held_out, answers.texts))[:3]]}
        report["runs"][estimator] = run
        log.info("%s: %s", estimator, {k: v for k, v in run.items() if k not in ("iterations", "examples")})
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))

    print(f"{'':8} {'score':>8} {'thumbs up':>10} {'win vs base':>12} {'KL':>6} {'words':>7} {'ended':>6} {'minutes':>8}")
    for name, row in [("base", report["base"]), *report["runs"].items()]:
        print(f"{name:8} {row['score'] or float('nan'):8.2f} {row['thumbs_up_rate']:10.2f} {row['win_rate_vs_base']:12.2f} "
              f"{row.get('kl_to_base', 0.0):6.2f} {row['mean_words']:7.1f} {row['ended_before_cap']:6.2f} "
              f"{row['seconds'] / 60:8.1f}")


if __name__ == "__main__":
    main()
