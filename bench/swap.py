"""Hot-swap benchmark: promote LoRA adapters on SmolLM2 while 16 streams load the real server.

A `python -m server` process serves SmolLM2 (the converted default, or --model) on a scratch
database of its own; 16 websocket clients send requests back to back (a new conversation each,
sampled, `--max-new-tokens` long). Once the load is steady, a LoRA adapter is promoted through
the registry (row update + NOTIFY, as `python -m deploy promote` does), `--swaps` times, with a
pause between, then the last promotion is rolled back. For each change it measures:

- commit -> first new token: from the registry transaction's commit (the moment `promote()`
  returns) to the first token of a request whose `started` frame reports the new version. A
  probe client starts a new conversation right after the commit (and again, each time one still
  starts on the old version), so this is what a user arriving then sees: NOTIFY + verify + load
  + swap + one prefill next to the 16 streams' decoding (target: under 1 s for LoRA);
- the server's own account (GET /api/version): seconds to verify and load the adapter, and how
  many requests were still running on the old version at the swap (they finish there);

and over the whole run, failed streams: requests refused, errored, or ended by anything but
"stop"/"length" (target: 0). Prints a table and writes JSON (--out).

    .venv/bin/python bench/swap.py                      # SmolLM2 from DATA_DIR (default ./var)
    .venv/bin/python bench/swap.py --swaps 1 --warmup-s 5   # a short run

Adapters have random, non-zero LoRA weights (the answers change; their quality is not the
point). The database is DATABASE_URL's server (a scratch database is created and dropped) or a
private embedded PostgreSQL in a temporary directory.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402  (after the path)
    admin_url, free_port, run_until_terminated, start_process, stop_process, version_info, wait_ready,
)
from support.database import scratch_database  # noqa: E402  (tests/support, via bench.harness)
from support.ws_load import StreamLoad  # noqa: E402

log = logging.getLogger("bench.swap")

ACTOR = "bench/swap.py"
TOPICS = [
    "the history of the Roman Empire", "how volcanoes form", "the life of honey bees", "the French Revolution",
    "how machine learning works", "the planets", "ocean currents", "the printing press", "the human heart",
    "the water cycle", "the industrial revolution", "how airplanes fly", "photosynthesis", "the internet",
    "how vaccines work", "the Great Wall of China",
]


@dataclass
class SwapResult:
    action: str  # promote | rollback
    version: str  # what should serve afterwards
    previous: str
    commit_to_first_new_token_ms: float | None
    commit_to_replica_serving_ms: float | None  # until GET /api/version first showed it
    server_load_s: float | None  # the server's own: verify + load the adapter
    server_heard_to_swap_s: float | None  # the server's own: NOTIFY heard -> new default
    draining_at_swap: int | None  # requests still on the previous version when it swapped
    old_requests_finished_after_swap: int  # started before, ended after: nothing was dropped


@dataclass
class Report:
    when: str
    model: str
    settings: dict
    machine: dict
    swaps: list[SwapResult] = field(default_factory=list)
    requests: int = 0
    failed_streams: int = 0
    failures: list[str] = field(default_factory=list)
    tokens_per_s: float | None = None
    # First-token latency of the load's own requests (sent -> first token), swap or not: the
    # floor under "commit -> first new token" on this machine at this load.
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    # Loading one adapter the way the engine does, in this process before the server starts
    # (no load, no other thread): what a swap costs without contention.
    idle_adapter_load_ms: float | None = None
    server_log: str | None = None


# -- the database and the adapters ----------------------------------------------------------------


def make_adapters(model_dir: Path, root: Path, count: int, rank: int, targets: str) -> list[Path]:
    """`count` LoRA checkpoints on the base, with random non-zero weights (seeded)."""
    import torch
    from peft import LoraConfig, get_peft_model

    from deploy.checkpoint import base_model_name
    from deploy.policy import load_base_policy, save_checkpoint

    base_id = base_model_name(model_dir)
    target_modules = targets if targets == "all-linear" else targets.split(",")
    paths = []
    for i in range(count):
        base = load_base_policy(model_dir)
        torch.manual_seed(1000 + i)
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules, init_lora_weights=False)
        adapter = get_peft_model(base.model, config)
        checkpoint_id = f"bench-lora-{i + 1}-{uuid.uuid4().hex[:6]}"
        save_checkpoint(root / checkpoint_id, adapter, checkpoint_id=checkpoint_id, parent_id=base_id,
                        base_model=base_id, config={"lora_rank": rank, "bench": True})
        paths.append(root / checkpoint_id)
    return paths


async def time_idle_load(model_dir: Path, adapter: Path, threads: int | None) -> float:
    """Median of 3 loads of `adapter` by a local engine serving the base, as the server's swap
    does it (verify, read, apply to the base weights), with nothing else running, in ms."""
    from server.engine.local import LocalEngineConfig, start_local_engine

    engine = await start_local_engine(model_dir, LocalEngineConfig(threads=threads, merge_adapters=False))
    times = []
    try:
        for i in range(3):
            started = time.monotonic()
            await engine.load_version(f"idle-{i}", adapter)
            times.append(time.monotonic() - started)
            await engine.unload_version(f"idle-{i}")
    finally:
        await engine.close()
    return _ms(statistics.median(times))


def register(url: str, model_dir: Path, paths: list[Path]) -> list[str]:
    """The base first (the server would, at its start): it is the adapters' parent."""
    from deploy import registry

    with registry.connect(url) as conn:
        registry.register_base(conn, model_dir, actor=ACTOR)
        return [registry.register(conn, path, actor=ACTOR).id for path in paths]


def registry_change(url: str, action: str, checkpoint_id: str | None) -> float:
    """Promote (or roll back) and return the monotonic time its transaction committed."""
    from deploy import registry

    with registry.connect(url) as conn:
        if action == "promote":
            registry.promote(conn, checkpoint_id, actor=ACTOR, reason="bench/swap.py")
        else:
            registry.rollback(conn, actor=ACTOR, reason="bench/swap.py")
        return time.monotonic()


# -- the server ---------------------------------------------------------------------------------


def start_server(args, database_url: str, model_dir: Path, workdir: Path, port: int) -> subprocess.Popen:
    env = {
        "DATABASE_URL": database_url,
        "MODEL": str(model_dir),
        "DATA_DIR": str(workdir / "data"),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ALLOW_ANONYMOUS": "true",
        "RATE_LIMIT_PER_MINUTE": "100000",
        "MAX_CONCURRENT_GENERATIONS": "1000",
        "MAX_NEW_TOKENS_LIMIT": str(max(args.max_new_tokens, 256)),
        "MAX_BATCH_SIZE": str(args.max_batch_size),
        "LOG_LEVEL": "INFO",
    }
    if args.engine_threads:
        env["ENGINE_THREADS"] = str(args.engine_threads)
    return start_process("server", [], env, workdir / "server.log")


# -- the load -----------------------------------------------------------------------------------


def new_load(base_url: str, streams: int, max_new_tokens: int) -> StreamLoad:
    """`streams` websocket clients asking for long essays back to back until stopped (the
    tests' load generator, tests/support/ws_load.py); a dropped stream is recorded, not fatal."""
    prompts = [f"Write a long, detailed essay about {topic}." for topic in TOPICS]
    return StreamLoad(base_url, streams, max_new_tokens=max_new_tokens, temperature=None, prompts=prompts,
                      token_prefix="bench-swap", recv_timeout_s=120, keep_going=True)


# -- one change under load ----------------------------------------------------------------------


async def measure_change(args, client, load: StreamLoad, database_url: str, action: str,
                         target: str, previous: str) -> tuple[SwapResult, float | None]:
    """The change's numbers, and the moment the replica was seen serving `target`."""
    committed_at = await asyncio.to_thread(registry_change, database_url, action,
                                           target if action == "promote" else None)
    deadline = committed_at + args.swap_timeout_s
    probe = asyncio.create_task(probe_first_token(load.ws_url, target, deadline))
    serving_at = None
    info = {}
    while time.monotonic() < deadline and serving_at is None:
        info = await version_info(client)
        if info["model_version"] == target:
            serving_at = time.monotonic()
        else:
            await asyncio.sleep(0.02)
    probed_at = await probe
    # The load's own streams may have got there first.
    candidates = [t for t in (probed_at, load.first_token_on(target, after=committed_at)) if t]
    first_token_at = min(candidates, default=None)
    swapped = info.get("last_swap") or {}
    return SwapResult(
        action=action,
        version=target,
        previous=previous,
        commit_to_first_new_token_ms=_ms(first_token_at - committed_at) if first_token_at else None,
        commit_to_replica_serving_ms=_ms(serving_at - committed_at) if serving_at else None,
        server_load_s=_round(swapped.get("load_s")) if swapped.get("version") == target else None,
        server_heard_to_swap_s=_round(swapped.get("heard_to_swap_s")) if swapped.get("version") == target else None,
        draining_at_swap=swapped.get("draining") if swapped.get("version") == target else None,
        old_requests_finished_after_swap=0,  # counted once the load has stopped
    ), serving_at


async def probe_first_token(ws_url: str, version: str, deadline: float) -> float | None:
    """A user arriving right after the commit: a new conversation, and another each time one
    starts on the old version (cancelled at once, before it is admitted to the batch, so the
    probe adds next to no load), until one reports `version`; returns when its first token came."""
    import websockets

    message = json.dumps({"type": "message", "content": "Hello! Who are you?", "params": {"max_new_tokens": 8}})
    async with websockets.connect(f"{ws_url}?token=bench-probe-{uuid.uuid4().hex}", max_size=None) as ws:
        new_answer = None  # message id of the probe answer running on `version`
        await ws.send(message)
        while time.monotonic() < deadline:
            frame = json.loads(await asyncio.wait_for(ws.recv(), 120))
            if frame["type"] == "started" and new_answer is None:
                if frame["model_version"] == version:
                    new_answer = frame["message_id"]
                else:
                    await ws.send(json.dumps({"type": "cancel", "message_id": frame["message_id"]}))
                    await asyncio.sleep(0.02)
                    await ws.send(message)
            elif frame["type"] == "token" and frame["message_id"] == new_answer:
                return time.monotonic()  # leaving closes the socket, which cancels the answer
            elif frame["type"] == "error" and new_answer is None:
                await asyncio.sleep(0.05)
                await ws.send(message)
    return None


def count_drained(load: StreamLoad, result: SwapResult, serving_at: float | None) -> None:
    """Requests on the previous version that finished after the replica served the new one:
    streams the swap let finish on the weights they started with."""
    if serving_at is not None:
        result.old_requests_finished_after_swap = sum(
            1 for r in load.records
            if r.model_version == result.previous and r.done_at is not None and r.done_at > serving_at
        )


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _round(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds, 3)


# -- the run ------------------------------------------------------------------------------------


async def run(args) -> Report:
    import httpx

    from deploy.base_model import resolve_base_model
    from deploy.checkpoint import base_model_name

    model_dir = resolve_base_model(args.model, Path(args.data_dir))
    base_id = base_model_name(model_dir)
    report = Report(
        when=datetime.now(UTC).isoformat(timespec="seconds"),
        model=str(model_dir),
        settings=dict(vars(args)),
        machine={"cpus": os.cpu_count(), "load_average": os.getloadavg(), "platform": platform.platform(),
                 "python": platform.python_version()},
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench-swap-"))
    log.info("work directory %s (adapters, server log)", workdir)
    with scratch_database(admin_url(args.database_url, workdir), "flywheel_bench_swap") as database_url:
        log.info("writing %d LoRA adapters on %s", args.swaps, base_id)
        paths = await asyncio.to_thread(make_adapters, model_dir, workdir / "checkpoints", args.swaps, args.rank,
                                        args.target_modules)
        adapters = await asyncio.to_thread(register, database_url, model_dir, paths)
        report.idle_adapter_load_ms = await time_idle_load(model_dir, paths[0], args.engine_threads)
        log.info("one adapter loads in %.0f ms on an idle engine", report.idle_adapter_load_ms)
        port = free_port()
        process = start_server(args, database_url, model_dir, workdir, port)
        report.server_log = str(workdir / "server.log")
        base_url = f"http://127.0.0.1:{port}"
        try:
            async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
                info = await wait_ready(client, process, args.start_timeout_s)
                log.info("server ready on %s, serving %s", base_url, info["model_version"])
                load = new_load(base_url, args.streams, args.max_new_tokens)
                load.start()
                started = time.monotonic()
                moments = []
                try:
                    await asyncio.sleep(args.warmup_s)
                    changes = [("promote", adapter) for adapter in adapters]
                    changes.append(("rollback", adapters[-2] if len(adapters) > 1 else base_id))
                    previous = base_id
                    for action, target in changes:
                        result, serving_at = await measure_change(
                            args, client, load, database_url, action, target, previous
                        )
                        log.info("%s to %s: %s", action, target, result)
                        report.swaps.append(result)
                        moments.append(serving_at)
                        previous = target
                        await asyncio.sleep(args.between_s)
                finally:
                    await load.stop()
                elapsed = time.monotonic() - started
                for result, serving_at in zip(report.swaps, moments):
                    count_drained(load, result, serving_at)
        finally:
            stop_process(process)
    report.requests = len(load.records)
    failed = [r for r in load.records if r.failed]
    report.failed_streams = len(failed)
    report.failures = [r.error or f"finish_reason={r.finish_reason}" for r in failed][:20]
    report.tokens_per_s = round(sum(r.tokens for r in load.records) / elapsed, 1)
    ttfts = sorted(r.first_token_at - r.sent_at for r in load.records if r.first_token_at is not None)
    if ttfts:
        report.ttft_p50_ms = _ms(statistics.median(ttfts))
        report.ttft_p95_ms = _ms(ttfts[min(len(ttfts) - 1, int(0.95 * len(ttfts)))])
    return report


def print_report(report: Report) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"Hot swap under {report.settings['streams']}-stream load ({Path(report.model).name})")
    for column in ("change", "to", "commit→first new token ms", "commit→replica serving ms",
                   "server load s", "heard→swap s", "draining at swap", "old finished after swap"):
        table.add_column(column, justify="left" if column in ("change", "to") else "right", no_wrap=True)
    for s in report.swaps:
        table.add_row(s.action, s.version, _cell(s.commit_to_first_new_token_ms), _cell(s.commit_to_replica_serving_ms),
                      _cell(s.server_load_s), _cell(s.server_heard_to_swap_s), _cell(s.draining_at_swap),
                      str(s.old_requests_finished_after_swap))
    console = Console(width=max(Console().width, 170))
    console.print(table)
    latencies = [s.commit_to_first_new_token_ms for s in report.swaps if s.commit_to_first_new_token_ms is not None]
    if latencies:
        console.print(f"commit→first new token: median {statistics.median(latencies):.0f} ms, "
                      f"max {max(latencies):.0f} ms over {len(latencies)} changes (target < 1000 ms)")
    console.print(f"the load's own first-token latency, swap or not: p50 {report.ttft_p50_ms} ms, "
                  f"p95 {report.ttft_p95_ms} ms; one adapter loads in {report.idle_adapter_load_ms} ms "
                  "on an idle engine")
    console.print(f"requests: {report.requests}, failed streams: {report.failed_streams} (target 0), "
                  f"throughput {report.tokens_per_s} tokens/s; load average at start "
                  f"{', '.join(f'{x:.1f}' for x in report.machine['load_average'])} on {report.machine['cpus']} CPUs")
    for failure in report.failures:
        console.print(f"  failed: {failure}")


def _cell(value) -> str:
    return "-" if value is None else str(value)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "var"))
    parser.add_argument("--database-url", default=os.environ.get("DATABASE_URL"),
                        help="a PostgreSQL server to create the scratch database on (default: an embedded one)")
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--swaps", type=int, default=3, help="adapters promoted one after another")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank of the adapters")
    parser.add_argument("--target-modules", default="q_proj,v_proj",
                        help="modules the adapters adapt: comma-separated names, or all-linear (retraining's default)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--engine-threads", type=int, default=None, help="server's torch threads (default: torch's)")
    parser.add_argument("--warmup-s", type=float, default=10.0, help="load before the first promotion")
    parser.add_argument("--between-s", type=float, default=8.0, help="load between two changes")
    parser.add_argument("--swap-timeout-s", type=float, default=60.0)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "swap.json"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from feedback.logs import configure_logging

    configure_logging()
    args = parse_args(argv)
    report = run_until_terminated(run(args))
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2))
    print(f"wrote {out}")
    if report.failed_streams:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
