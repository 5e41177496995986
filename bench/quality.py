"""What each ENGINE_DTYPE costs in quality, against float32, on SmolLM2 (or MODEL):

- greedy agreement: 64 everyday prompts (bench/data/everyday_prompts.txt, the first 64) answered
  greedily by the local engine in each format; per prompt, the share of float32's answer tokens
  reproduced before the first difference, and the share of prompts answered identically;
- perplexity on a fixed text: the chosen dialogues of the first 8 evaluation pairs of HH-RLHF's
  harmless-base test split (shared/data/hh-rlhf; human-written), 256 tokens each, scored with
  the engine's own runner in each format; reported with its difference to float32's.

    .venv/bin/python bench/quality.py                        # every format, results in bench/out/quality.json
    .venv/bin/python bench/quality.py --dtypes float32 int4 --max-new-tokens 32

Bounds the default must meet (the README's): perplexity within +2% of float32 and at least
0.6 of float32's greedy tokens reproduced on average (a 135M model's greedy continuations
diverge at the first near-tie, so exact agreement of whole answers is a strict measure).
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import math
import os
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

PROMPTS_FILE = ROOT / "bench" / "data" / "everyday_prompts.txt"
HH_RLHF = ROOT.parent / "shared" / "data" / "hh-rlhf" / "harmless-base-test.jsonl.gz"
MAX_PPL_INCREASE = 0.02
MIN_TOKEN_AGREEMENT = 0.6


def prompts(count: int) -> list[str]:
    lines = [line.strip() for line in PROMPTS_FILE.read_text().splitlines()]
    chosen = [line for line in lines if line and not line.startswith("#")][:count]
    if len(chosen) < count:
        raise SystemExit(f"{PROMPTS_FILE} has {len(chosen)} prompts, fewer than {count}")
    return chosen


def fixed_texts(path: Path, count: int = 8) -> list[str]:
    """The chosen dialogue of evaluation pairs 0, 5, 10, ... (the split bench/reward.py uses)."""
    if not path.is_file():
        raise SystemExit(f"the perplexity text {path} is missing (see shared/data/hh-rlhf/README.md)")
    texts = []
    with gzip.open(path, "rt") as handle:
        for index, line in enumerate(handle):
            if index % 5 == 0:
                texts.append(json.loads(line)["chosen"].strip())
            if len(texts) == count:
                break
    return texts


async def greedy_answers(model_dir: Path, dtype: str, questions: list[str], max_new_tokens: int) -> tuple[list[list[int]], float]:
    """Every prompt answered greedily by the local engine in `dtype`, all at once (one batch);
    the token ids of each answer and the seconds it took."""
    from server.engine.base import SamplingParams
    from server.engine.local import LocalEngineConfig, start_local_engine
    from server.prompt import build_prompt

    config = LocalEngineConfig(max_batch_size=len(questions), max_prefill_tokens=2048, dtype=dtype, seed=0)
    engine = await start_local_engine(model_dir, config)
    try:
        params = SamplingParams(temperature=0, top_p=1.0, max_new_tokens=max_new_tokens)
        started = time.perf_counter()
        generations = [
            engine.submit(build_prompt([{"role": "user", "content": q}], engine.tokenizer,
                                       context_length=engine.context_length, max_new_tokens=max_new_tokens), params)
            for q in questions
        ]
        collected = await asyncio.gather(*(g.collect() for g in generations))
        elapsed = time.perf_counter() - started
        # Compared as the tokens of the text users get (the same text gives the same ids).
        return [engine.tokenizer.encode(text, add_special_tokens=False) for text, _ in collected], elapsed
    finally:
        await engine.close()


def perplexity(model_dir: Path, dtype: str, texts: list[str], tokens_per_text: int) -> float:
    """exp(mean negative log-likelihood) of each text's tokens after its first, through the
    engine's runner in `dtype` (one prefill per text)."""
    import torch
    import torch.nn.functional as F

    from deploy.policy import load_base_policy
    from server.engine.kv_cache import SlotKVCache
    from server.engine.runner import make_runner

    policy = load_base_policy(model_dir)
    model, tokenizer = policy.model, policy.tokenizer
    runner = make_runner(model, weight_format=dtype)
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    total, count = 0.0, 0
    with torch.inference_mode():
        for text in texts:
            ids = tokenizer.encode(text, add_special_tokens=False)[:tokens_per_text]
            cache = SlotKVCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, runner.dtype,
                                max_rows=1, max_tokens=len(ids), initial_rows=1, initial_tokens=len(ids))
            positions = torch.arange(len(ids))[None, :]
            mask = (torch.arange(len(ids))[None, None, :] <= positions[:, :, None])[:, None]
            logits = runner.forward(torch.tensor([ids]), positions, mask,
                                    cache.prefill_view(torch.tensor([0]), positions, len(ids)), every_position=True)
            nll = F.cross_entropy(logits[0, :-1], torch.tensor(ids[1:]), reduction="sum")
            total += float(nll)
            count += len(ids) - 1
    return math.exp(total / count)


def agreement(reference: list[list[int]], answers: list[list[int]]) -> tuple[float, float]:
    """(mean share of the reference's tokens matched before the first difference, share of
    answers identical to the reference)."""
    shares, identical = [], 0
    for want, got in zip(reference, answers):
        prefix = 0
        for a, b in zip(want, got):
            if a != b:
                break
            prefix += 1
        shares.append(prefix / max(len(want), 1))
        identical += want == got
    return sum(shares) / len(shares), identical / len(reference)


async def main(args) -> None:
    from deploy.base_model import resolve_base_model

    model_dir = resolve_base_model(args.model, Path(args.data_dir))
    questions = prompts(args.prompts)
    texts = fixed_texts(Path(args.text))
    load = os.getloadavg()
    results, reference = {}, None
    dtypes = ["float32", *[d for d in args.dtypes if d != "float32"]]
    for dtype in dtypes:
        answers, seconds = await greedy_answers(model_dir, dtype, questions, args.max_new_tokens)
        ppl = perplexity(model_dir, dtype, texts, args.tokens_per_text)
        if reference is None:
            reference, reference_ppl = answers, ppl
        share, identical = agreement(reference, answers)
        row = {
            "dtype": dtype,
            "greedy_token_agreement": round(share, 4),
            "greedy_identical_answers": round(identical, 4),
            "perplexity": round(ppl, 4),
            "perplexity_change": round(ppl / reference_ppl - 1, 4),
            "within_bounds": ppl / reference_ppl - 1 <= MAX_PPL_INCREASE and share >= MIN_TOKEN_AGREEMENT,
            "greedy_seconds": round(seconds, 1),
        }
        results[dtype] = row
        print(json.dumps(row), flush=True)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_dir": str(model_dir),
        "prompts": len(questions),
        "max_new_tokens": args.max_new_tokens,
        "perplexity_text": f"{len(texts)} HH-RLHF chosen dialogues x {args.tokens_per_text} tokens",
        "bounds": {"max_perplexity_increase": MAX_PPL_INCREASE, "min_token_agreement": MIN_TOKEN_AGREEMENT},
        "load_average_at_start": [round(x, 2) for x in load],
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "results": results,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print("\n| dtype | greedy tokens agreeing with float32 | identical answers | perplexity | vs float32 |")
    print("|---|---|---|---|---|")
    for row in results.values():
        print(f"| {row['dtype']} | {row['greedy_token_agreement']:.3f} | {row['greedy_identical_answers']:.3f} | "
              f"{row['perplexity']:.3f} | {row['perplexity_change']:+.2%} |")
    print(f"\nwritten to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "var"))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tokens-per-text", type=int, default=256)
    parser.add_argument("--text", default=str(HH_RLHF), help="the HH-RLHF file the perplexity text comes from")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "quality.json"))
    args = parser.parse_args()
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    asyncio.run(main(args))
