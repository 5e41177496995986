"""How far one round's SFT on demonstrations, or on liked answers, moves the policy, without
the whole loop; and, beside it, KTO on the same thumbs.

    .venv/bin/python bench/sft_probe.py --preference question --demonstrations 16
    .venv/bin/python bench/sft_probe.py --preference simple --from liked --demonstrations 96
    .venv/bin/python bench/sft_probe.py --preference simple --from liked --method kto --samples s.json

`--from edits` (default): the base policy (SmolLM2-135M by default) answers `--demonstrations`
training-side prompts of bench/data/everyday_prompts.txt greedily; a simulated user rewrites
each answer into the one the preference wants (bench/preferences.py's `rewrite`, as
`bench/loop.py --edits` does). `--from liked`: the base policy answers them as the loop's users
see it (2 sampled answers each, their client's temperature and top-p, the loop's token limit)
and the answers the preference gives a thumbs up are kept (a cut one learnt without its end of
turn), as a round reads them after a day of the loop. The round's SFT stage (retrain/sft.py,
RETRAIN_SFT* defaults unless given) fine-tunes a fresh LoRA adapter on them.

`--method kto` (with `--from liked`) learns every sampled answer with its thumb instead, as the
round's KTO stage does (retrain/kto.py, `kto.*` defaults unless `--epochs`, `--learning-rate`,
`--kto-beta` say otherwise). `--samples FILE` keeps the sampled answers (written when missing)
so two methods learn from the same answers.

Then base and fine-tuned policy answer the held-out prompts greedily, and the
script prints the preference's thumbs-up rate and win rate of the fine-tuned answers against
the base's, the answer length, the SFT loss before and after, and the KL to the base (the
gate's exact per-token measure on the fine-tuned answers, nats per answer).
"""

from __future__ import annotations

import argparse
import json
import logging
import random
import time
from datetime import datetime, timezone
from pathlib import Path
from uuid import uuid4

import torch

ROOT = Path(__file__).resolve().parents[1]


def main(argv=None) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers import GenerationConfig

    from bench.loop import USER_SAMPLING, load_prompts, split_prompts
    from bench.preferences import PREFERENCES, win_rate
    from deploy.base_model import resolve_base_model
    from retrain.kto import KTOConfig, train_kto
    from retrain.ppo import PPOConfig, eos_token_ids, left_pad, mask_after_eos, tokenize_prompts
    from retrain.round import greedy_answers, kl_to_reference
    from retrain.settings import RetrainSettings
    from retrain.sft import SFTExample, train_sft

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preference", choices=sorted(PREFERENCES), default="question")
    parser.add_argument("--from", dest="source", choices=("edits", "liked"), default="edits",
                        help="edits: the user rewrites each greedy answer; liked: the thumbed-up ones of 2 sampled answers")
    parser.add_argument("--demonstrations", type=int, default=16, help="training-side prompts answered")
    parser.add_argument("--held-out", type=int, default=12, help="held-out prompts measured")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0, help="seed of the prompt sample and the sampled answers")
    parser.add_argument("--method", choices=("sft", "kto"), default="sft",
                        help="sft: learn the liked answers (or edits); kto: every sampled answer with its thumb")
    parser.add_argument("--kto-beta", type=float, default=0.1)
    parser.add_argument("--samples", default=None, help="JSON of the sampled answers: read when it exists, else written")
    parser.add_argument("--epochs", type=int, default=None, help="epochs (default: RETRAIN_SFT_EPOCHS, or kto.epochs with --method kto)")
    parser.add_argument("--learning-rate", type=float, default=None, help="learning rate (default: RETRAIN_SFT_LEARNING_RATE, or kto.learning_rate with --method kto)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", default=None, help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default="var")
    parser.add_argument("--out", default=None, help="write the numbers and examples as JSON here")
    args = parser.parse_args(argv)
    if args.method == "kto" and args.source != "liked":
        parser.error("--method kto learns the sampled answers' thumbs: it needs --from liked")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    preference = PREFERENCES[args.preference]
    training, held_out = split_prompts(load_prompts(), 40)
    random.Random(args.seed).shuffle(training)
    train_prompts, eval_prompts = training[: args.demonstrations], held_out[: args.held_out]
    model_dir = resolve_base_model(args.model, Path(args.data_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    config = RetrainSettings(_env_file=None, model=str(model_dir)).retrain_config(model_dir)
    if args.epochs:
        config.sft.epochs = args.epochs
    if args.learning_rate:
        config.sft.learning_rate = args.learning_rate

    config.round.gate_max_new_tokens = args.max_new_tokens

    def answer(policy, prompts):
        """Greedy answers, the gate's decoding (retrain/round.py's greedy_answers)."""
        _, tokens = tokenize_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts], 10**6)
        return greedy_answers(policy, tokenizer, tokens, config, "answers")

    def sampled(prompts, per_prompt: int) -> list[tuple[str, str, bool]]:
        """(prompt, answer, ended) for `per_prompt` answers to each prompt, sampled as the loop's
        users' client asks for them."""
        eos_ids = eos_token_ids(tokenizer, model)
        generation = GenerationConfig(do_sample=True, max_new_tokens=args.max_new_tokens, eos_token_id=eos_ids,
                                      pad_token_id=eos_ids[0] if tokenizer.pad_token_id is None else tokenizer.pad_token_id,
                                      **USER_SAMPLING)
        _, tokens = tokenize_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts], 10**6)
        out = []
        for start in range(0, len(prompts), 16):
            ids, mask = left_pad(tokens[start : start + 16], generation.pad_token_id)
            for _ in range(per_prompt):
                generated = model.generate(input_ids=ids, attention_mask=mask, generation_config=generation)
                response, kept, ended = mask_after_eos(generated[:, ids.shape[1] :], eos_ids, generation.pad_token_id)
                out += [(prompt, tokenizer.decode(r[:n], skip_special_tokens=True).strip(), bool(e))
                        for prompt, r, n, e in zip(prompts[start : start + 16], response.tolist(), kept.sum(1).tolist(), ended.tolist())]
        return out

    def example(prompt: str, answer: str, ended: bool) -> SFTExample:
        kind = "demonstration" if args.source == "edits" else "liked"  # an edit is a person's text
        return SFTExample([{"role": "user", "content": prompt}], answer, ended, datetime.now(timezone.utc), f"{kind}:{uuid4()}")

    started = time.perf_counter()
    if args.source == "edits":
        base_train = answer(model, train_prompts)
        demos = [example(prompt, preference.rewrite(text, prompt).strip(), True)
                 for prompt, text in zip(train_prompts, base_train.texts)]
        seen = len(demos)
    else:
        if args.samples and Path(args.samples).exists():
            answers = [tuple(a) for a in json.loads(Path(args.samples).read_text())]
        else:
            answers = sampled(train_prompts, 2)
            if args.samples:
                Path(args.samples).write_text(json.dumps(answers))
        demos = [example(prompt, text, ended) for prompt, text, ended in answers if preference.likes(text)]
        seen = len(answers)
    base_eval = answer(model, eval_prompts)
    if args.method == "kto":
        kto = KTOConfig(beta=args.kto_beta, epochs=args.epochs or KTOConfig.epochs,
                        learning_rate=args.learning_rate or KTOConfig.learning_rate)
        result = train_kto(model, tokenizer, [(example(p, t, e), preference.likes(t)) for p, t, e in answers if t],
                           kto, config.ppo)
    else:
        result = train_sft(model, tokenizer, [d for d in demos if d.answer], config.sft, config.ppo)
    tuned = result.model
    tuned_eval = answer(tuned, eval_prompts)
    kl = kl_to_reference(tuned, None, tuned_eval, PPOConfig().temperature)
    words = lambda texts: sum(len(t.split()) for t in texts) / len(texts)  # noqa: E731
    report = {
        "preference": preference.name, "model": str(model_dir), "from": args.source, "seed": args.seed,
        "method": args.method, **({"kto_beta": args.kto_beta} if args.method == "kto" else {}),
        "answers_seen": seen, "demonstrations": len(demos), "cut": sum(not d.ended for d in demos),
        "held_out_prompts": len(eval_prompts), "sft": result.stats,
        "base": {"thumbs_up_rate": sum(map(preference.likes, base_eval.texts)) / len(eval_prompts),
                 "words": words(base_eval.texts)},
        "sft_policy": {"thumbs_up_rate": sum(map(preference.likes, tuned_eval.texts)) / len(eval_prompts),
                       "words": words(tuned_eval.texts),
                       "win_rate_vs_base": win_rate(preference, tuned_eval.texts, base_eval.texts),
                       "kl_to_base": sum(kl) / len(kl)},
        "seconds": time.perf_counter() - started,
        "examples": [{"prompt": p, "base": b, "sft": t} for p, b, t in zip(eval_prompts[:4], base_eval.texts, tuned_eval.texts)],
        "demonstration_examples": [d.answer for d in demos[:3]],
    }
    print(json.dumps(report, indent=2))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
