"""Decode-step time of the local engine's runner per ENGINE_DTYPE, interleaved (one step of each
format in turn, so a shared machine's load hits them alike), at 1 and 16 rows.

    .venv/bin/python bench/decode_steps.py --threads 1 --rounds 15 --out bench/out/decode-steps.json

Prints and writes the median and fastest step per format and row count, with the load average.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main(args) -> None:
    import torch

    from deploy.base_model import resolve_base_model
    from deploy.policy import load_base_policy
    from server.engine.kv_cache import SlotKVCache
    from server.engine.runner import make_runner

    torch.set_num_threads(args.threads)
    model = load_base_policy(resolve_base_model(args.model, Path(args.data_dir))).model
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    runners = {fmt: make_runner(model, weight_format=fmt) for fmt in args.dtypes}
    load_start = os.getloadavg()
    steps = {}
    with torch.inference_mode():
        for rows in args.rows:
            caches = {}
            for fmt, runner in runners.items():
                caches[fmt] = SlotKVCache(config.num_hidden_layers, config.num_key_value_heads, head_dim, runner.dtype,
                                          max_rows=rows, max_tokens=2048, initial_rows=rows, initial_tokens=256)
            times = {fmt: [] for fmt in runners}
            for i in range(args.rounds):
                positions = torch.full((rows,), args.context + i)
                kv_length = args.context + i + 1
                mask = (torch.arange(kv_length)[None, :] <= positions[:, None])[:, None, None]
                ids = torch.randint(0, 1000, (rows, 1))
                for fmt, runner in runners.items():
                    view = caches[fmt].decode_view(rows, positions, kv_length)
                    started = time.perf_counter()
                    runner.forward(ids, positions[:, None], mask, view)
                    times[fmt].append(time.perf_counter() - started)
            for fmt, values in times.items():
                steps[f"{fmt}@{rows}"] = {"median_ms": round(statistics.median(values) * 1e3, 1),
                                          "min_ms": round(min(values) * 1e3, 1)}
                print(f"{fmt:9s} {rows:3d} rows: median {steps[f'{fmt}@{rows}']['median_ms']:8.1f} ms, "
                      f"fastest {steps[f'{fmt}@{rows}']['min_ms']:8.1f} ms", flush=True)
    report = {"threads": args.threads, "rounds": args.rounds, "context": args.context,
              "load_average_at_start": [round(x, 2) for x in load_start],
              "load_average_at_end": [round(x, 2) for x in os.getloadavg()], "steps": steps}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written to {out}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "var"))
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16", "int8", "int4"])
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--context", type=int, default=100, help="positions already in the cache")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "decode-steps.json"))
    main(parser.parse_args())
