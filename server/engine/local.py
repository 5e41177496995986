"""The local engine: in-process transformers, many concurrent requests, one batched forward.

Why our own scheduler rather than transformers' `generate_batch` / `transformers serve
--continuous-batching`: measured with bench/serve.py on this project's 2-core CPU, at 16
streams this engine produces about 1.7x the tokens per CPU-second of `transformers serve
--continuous-batching` and about 7x those of one-request-at-a-time `generate` (a lean Llama
forward over pre-packed weights, runner.py, and a dense per-row KV cache, kv_cache.py, instead
of paged attention). It also gives what the server needs and that manager does not: several
model versions live at once (hot swap), per-request sampling params, streaming text deltas,
cancellation within a step.

How a step works (one worker thread, off the event loop):

1. Commands from the loop are applied: new requests queue up, cancellations free their rows
   at once, versions are added or dropped.
2. For each model version with work: waiting requests are admitted into free rows (up to
   `max_batch_size` rows in all); prompts are prefilled in chunks of at most
   `max_prefill_tokens` padded tokens per forward, so a long prompt never stalls the
   streams already decoding for long; a finished prefill yields the first token.
3. One decode forward runs every decoding row of that version: one token each, sampled with
   each request's own params; a row that hits a stop token or its length limit is finished
   and its row reused (the batch stays dense: the last row moves into the hole).
4. Events are handed to the loop in one `call_soon_threadsafe` per step.

Prefix reuse: a row that a sequence leaves keeps its keys and values (`_Batch.resident`
records which tokens they are for), and a new request starts from the free row sharing the
longest prefix with its prompt, so only the rest is prefilled. The next turn of a conversation
is the last turn's prompt and answer plus the new message, and the same prompt asked again (a
regenerate, an API client retrying) shares all but its last token: their prefill shrinks to
the new tokens, which is most of their time to first token. A row is taken over when the new
prompt extends the prompt of the request that left it; a smaller match (the system prompt
every conversation starts with) is copied into another row, an empty one first, then the least
recently left, so each conversation keeps its own row for its next turn.

Versions: each has its own runner and KV cache. One base weight set is loaded (and packed)
once; a LoRA version is that runner plus the adapter's A/B matrices, applied on the fly
(runner.py `with_adapter`), so loading one costs reading and hashing its file - tens of ms,
whatever the model's size - and a swap waits for nothing else. With `merge_adapters` the
adapter is then folded into private copies of the weights it touches, in the background once
the version serves (an adapter on every projection costs ~12% per decode step unmerged on
SmolLM2). Everything a version needs, its KV cache included, is built off the loop and off the
worker. A request keeps the version it was submitted on, so during a swap both versions decode
side by side until the old one drains.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch

from deploy.base_model import is_model_dir
from deploy.checkpoint import MANIFEST_NAME, read_manifest
from deploy.policy import Policy, load_adapter, load_base_policy, load_policy

from ..prompt import Prompt
from .base import (
    EngineNotReady,
    EngineStats,
    FinalEvent,
    Generation,
    SamplingLimits,
    SamplingParams,
    TokenEvent,
    Usage,
    VersionedEngine,
    VersionRecord,
)
from .detokenizer import IncrementalDetokenizer
from .kv_cache import SlotKVCache
from .runner import make_runner
from .sampling import sample_tokens

log = logging.getLogger(__name__)

# Tokens that end an assistant turn in common chat templates, when the vocabulary has them
# (SmolLM2: <|im_end|> is its EOS; <|endoftext|> ends a document).
# Weight formats a LoRA version is never merged in. An int4 base keeps the 4-bit file's own
# grid exactly (runner._quantize_int4); the base plus an adapter lies on no grid, and quantizing
# it again costs what the adapter is worth: on a SmolLM2 projection, an adapter of 1% (5%) of
# the weight's norm merged into int4 multiplies with 1.1% (5.1%) error, applied on the fly with
# 0.24%, bfloat16's.
UNMERGED_FORMATS = frozenset({"int4"})

END_OF_TURN_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<|end|>", "<end_of_turn>")


@dataclass(frozen=True)
class LocalEngineConfig:
    max_batch_size: int = 32  # rows decoded together, across all versions
    max_waiting: int = 512  # requests queued beyond the batch before submit says overloaded
    # Padded prompt tokens per prefill forward: streams already decoding wait for each prefill
    # forward, so this bounds their stall (~1 s at 256 on this CPU) and, for a burst of
    # arrivals, lets the first ones start streaming before the last are prefilled.
    max_prefill_tokens: int = 256
    context_length: int = 2048  # prompt + answer per sequence (capped by the model's own)
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    fast_path: bool = True  # the lean Llama forward (runner.py) when the model is a Llama
    # Fold a LoRA version's adapter into private copies of the weights it touches, in the
    # background once it serves: base decode speed, for that memory and seconds of CPU per swap.
    # Not under int4 (UNMERGED_FORMATS): there the adapter stays applied on the fly.
    merge_adapters: bool = True
    # How the Llama runner stores its weights (runner.WEIGHT_FORMATS): float32, bfloat16, int8 or
    # int4 weight-only; "auto" is int4 where the Llama runner serves the model, else float32 (the
    # server's default; the engine's own stays float32, the exact maths tests hold it to). The
    # model stays float32 in memory (adapters merge into it); the runner
    # decodes from its own copy in this format, reading fewer bytes per step.
    dtype: str = "float32"
    # Admit a request into the free row holding the longest prefix of its prompt (see above);
    # False prefills every prompt from its first token.
    reuse_prefixes: bool = True
    # A version's KV cache is released when it goes idle only beyond this size: below it, the
    # prefixes its rows hold wait for their conversations' next turns (users type between them,
    # so an engine often goes idle between turns). None: four times the initial size.
    kv_cache_keep_mb: float | None = 512
    seed: int | None = None  # sampling seed, for reproducible runs
    limits: SamplingLimits = SamplingLimits()


@dataclass
class _Version(VersionRecord):
    """Loop-side record of a loaded version: what requests on it are built with."""

    tokenizer: Any
    context_length: int


@dataclass(eq=False)
class _Sequence:
    """Worker-side state of one request."""

    generation: Generation
    version: str
    prompt_ids: list[int]
    temperature: float
    top_p: float
    max_new_tokens: int
    detokenizer: IncrementalDetokenizer
    generated: list[int] = field(default_factory=list)
    cached: int = 0  # positions whose keys/values are in the cache
    row: int = -1  # KV cache row while admitted
    state: str = "waiting"  # waiting -> prefilling -> decoding -> finished (holds no row)
    reported: bool = False  # its FinalEvent was emitted (exactly once)

    @property
    def request_id(self) -> str:
        return self.generation.request_id


class _Held(NamedTuple):
    """What a free KV cache row holds: the keys/values of `tokens` at its first positions, left
    by a request whose prompt was the first `prompt_length` of them."""

    tokens: list[int]
    prompt_length: int


class _Batch:
    """Worker-side state of one version: its model, KV cache and sequences."""

    def __init__(self, name: str, model: Any, runner: Any, tokenizer: Any, stop_ids: frozenset[int],
                 config: LocalEngineConfig, context_length: int, initial_rows: int = 4):
        self.name = name
        self.model = model  # its config, dtype and device (a LoRA version's: the base model)
        self.tokenizer = tokenizer
        self.stop_ids = stop_ids
        self.context_length = context_length
        self.waiting: deque[_Sequence] = deque()
        self.prefilling: list[_Sequence] = []
        self.decoding: list[_Sequence] = []  # decoding[i].row == i, always
        self.occupant: dict[int, _Sequence] = {}
        # Free rows that still hold a sequence's keys/values: row -> the tokens at its first
        # positions. Always free rows; in the order they were left (least recently used first).
        self.resident: dict[int, _Held] = {}
        model_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        n_heads = model_config.num_attention_heads
        self.cache = SlotKVCache(
            n_layers=model_config.num_hidden_layers,
            n_kv_heads=getattr(model_config, "num_key_value_heads", None) or n_heads,
            head_dim=getattr(model_config, "head_dim", None) or model_config.hidden_size // n_heads,
            dtype=getattr(runner, "dtype", model.dtype),  # what the runner computes in
            device=model.device,
            max_rows=config.max_batch_size,
            max_tokens=context_length,
            initial_rows=initial_rows,
            keep_bytes=None if config.kv_cache_keep_mb is None else int(config.kv_cache_keep_mb * 2**20),
        )
        self.runner = runner

    @property
    def active(self) -> int:
        return len(self.prefilling) + len(self.decoding)

    def has_work(self) -> bool:
        return bool(self.waiting or self.prefilling or self.decoding)

    def take_row(self, prompt_ids: list[int], reuse: bool) -> tuple[int, int]:
        """A free row for a new sequence, and how many of its prompt's first positions that row
        already holds. The resident row sharing the longest prefix with the prompt (when `reuse`)
        is taken over when the prompt extends the prompt of the request that left it (that
        conversation's next turn, or the same prompt again: what the row holds past it is that
        request's answer, of no use to anyone else); a smaller match (the system prompt every
        conversation starts with) is copied into an empty row (the cache grows for one while it
        stays within what an idle cache keeps), else into the least recently left resident one,
        so the row keeps its tokens for its own conversation. The prompt's last token is always
        prefilled (its logits give the first token)."""
        best, shared = None, 0
        if reuse:
            for candidate, held in self.resident.items():
                length = _common_prefix(held.tokens, prompt_ids)
                if length > shared:
                    best, shared = candidate, length
        shared = min(shared, len(prompt_ids) - 1)
        if best is not None and shared >= self.resident[best].prompt_length - 1:
            row = best
        else:
            row = next((r for r in range(self.cache.rows) if r not in self.occupant and r not in self.resident), None)
            if row is None:  # every free row holds a prefix: grow while the cache may, else evict
                if self.resident and not self.cache.can_grow_rows():
                    row = next(iter(self.resident))  # the least recently left
                else:
                    row = next(r for r in itertools.count() if r not in self.occupant and r not in self.resident)
            self.cache.reserve(row + 1, self.cache.tokens)
            if best is not None and best != row:
                self.cache.copy_row(best, row, shared)
            elif best is None:
                shared = 0
        self.resident.pop(row, None)
        return row, shared

    def leave_row(self, row: int, held: _Held) -> None:
        """Row `row` is free and holds the keys/values of `held.tokens` at its first positions."""
        self.resident.pop(row, None)
        if held.tokens:
            self.resident[row] = held

    def release_cache(self) -> None:
        self.cache.release()
        self.resident.clear()


class LocalEngine(VersionedEngine):
    """See the module docstring. Construct, `await start()`, then `await load_base(path)`."""

    verifies_checkpoints = True  # load_version hashes every file it reads

    def __init__(self, config: LocalEngineConfig = LocalEngineConfig()):
        self.config = config
        self._versions: dict[str, _Version] = {}
        self._default: str | None = None
        self._base: Policy | None = None  # the one base weight set LoRA versions are applied to
        self._base_runner: Any = None  # its packed weights, shared by every LoRA version
        self._base_stops: frozenset[int] = frozenset()  # its stop ids (reading the vocabulary takes ~50 ms)
        self._merging: dict[str, asyncio.Task] = {}  # version -> folding its adapter in (merge_adapters)
        self._generations: dict[str, Generation] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        # Worker side: commands in, batches per version, events out.
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._batches: dict[str, _Batch] = {}
        self._sequences: dict[str, _Sequence] = {}
        self._outbox: list[tuple[Generation, TokenEvent | FinalEvent]] = []
        self._stats = EngineStats()
        self._stats_lock = threading.Lock()
        self._generator = torch.Generator()
        if config.seed is not None:
            self._generator.manual_seed(config.seed)
        else:
            self._generator.seed()

    # ------------------------------------------------------------------ lifecycle (loop side)

    async def start(self) -> None:
        if self._thread is not None:
            return
        if self._closed:
            raise EngineNotReady("this engine was closed; create a new one")
        self._loop = asyncio.get_running_loop()
        if self.config.threads:
            torch.set_num_threads(self.config.threads)
        self._thread = threading.Thread(target=self._worker, name="local-engine", daemon=True)
        self._thread.start()

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for generation in list(self._generations.values()):
            generation.cancel()
        for task in self._merging.values():
            task.cancel()
        await asyncio.gather(*self._merging.values(), return_exceptions=True)
        if self._thread is not None:
            self._commands.put(("stop",))
            await asyncio.to_thread(self._thread.join)
        self._versions.clear()
        self._default = None
        self._base = self._base_runner = None

    @property
    def ready(self) -> bool:
        return (
            not self._closed
            and self._default is not None
            and self._thread is not None
            and self._thread.is_alive()
        )

    # ------------------------------------------------------------------ versions (loop side)

    @property
    def tokenizer(self) -> Any:
        return self._require_default().tokenizer

    @property
    def context_length(self) -> int:
        return self._require_default().context_length

    @property
    def default_version(self) -> str:
        return self._require_default().name

    async def load_base(self, path: str | Path, *, make_default: bool = True) -> str:
        """Load the base model directory (verified if it is a checkpoint); LoRA versions are
        applied to its weights. Returns its version name."""
        started = time.perf_counter()
        policy = await asyncio.to_thread(load_base_policy, Path(path))
        batch = await asyncio.to_thread(self._base_batch, policy)
        self._base, self._base_runner, self._base_stops = policy, batch.runner, batch.stop_ids
        self._add(batch, make_default=make_default or self._default is None)
        log.info("loaded the base %s in %.2f s", batch.name, time.perf_counter() - started)
        return batch.name

    async def load_version(self, version: str, path: str | Path, *, make_default: bool = False) -> None:
        """Verify and load checkpoint `path` as `version` (see the module docstring for what
        that costs); nothing changes when it fails."""
        if version in self._versions:
            raise ValueError(f"version {version!r} is already loaded; unload it first or use another id")
        started = time.perf_counter()
        # Off the loop, and off the worker (which keeps decoding the versions already served).
        batch = await asyncio.to_thread(self._prepare_version, version, Path(path))
        if self._closed:
            raise EngineNotReady("the engine was closed while the version loaded")
        if version in self._versions:
            raise ValueError(f"version {version!r} was loaded meanwhile")
        self._add(batch, make_default=make_default)
        log.info("loaded %s in %.3f s (%s)", version, time.perf_counter() - started, _runner_kind(batch.runner))
        weight_format = getattr(batch.runner, "weight_format", "float32")
        if getattr(batch.runner, "adapted", False) and weight_format in UNMERGED_FORMATS:
            log.info("%s keeps its adapter applied on the fly: merged %s weights would be quantized again",
                     version, weight_format)
        elif self.config.merge_adapters and getattr(batch.runner, "adapted", False):
            self._merging[version] = asyncio.create_task(self._merge(version, batch.runner), name=f"merge-{version}")

    def _base_batch(self, policy: Policy) -> _Batch:
        return self._batch(policy.version, policy.model, self._make_runner(policy.model), policy.tokenizer)

    def _make_runner(self, model: Any, reuse: Any = None) -> Any:
        _prefer_sdpa(model)
        return make_runner(model, fast=self.config.fast_path, batch_hint=min(self.config.max_batch_size, 16),
                           reuse=reuse, weight_format=self.config.dtype)

    def _batch(self, name: str, model: Any, runner: Any, tokenizer: Any) -> _Batch:
        """Everything the worker needs to serve a version, its KV cache allocated, built here so
        the worker only adds it to its table."""
        base = self._base
        shares_base = base is not None and model is base.model and tokenizer is base.tokenizer
        stop_ids = self._base_stops if shares_base else _stop_token_ids(model, tokenizer)
        context_length = _context_length(model, self.config.context_length)
        return _Batch(name, model, runner, tokenizer, stop_ids, self.config, context_length, self._rows_hint())

    def _rows_hint(self) -> int:
        """Rows a new version's KV cache starts with: the rows in use now (rounded up to a power of
        two, at least 4), since after a swap every stream moves over to it. Allocated here, off
        the worker; growing 4 -> 8 -> 16 on the worker instead zeroed and copied the cache while
        every stream waited (50-800 ms a growth, measured on a busy 2-core machine)."""
        with self._stats_lock:
            active = self._stats.active + self._stats.waiting
        rows = 4
        while rows < active:
            rows *= 2
        return min(rows, self.config.max_batch_size)

    def _prepare_version(self, name: str, path: Path) -> _Batch:
        base, base_runner = self._base, self._base_runner
        if base is not None and path.resolve() == base.path.resolve():
            # The base again (a rollback to it after it drained): its weights never left.
            return self._batch(name, base.model, base_runner, base.tokenizer)
        if not (path / MANIFEST_NAME).exists() and is_model_dir(path):
            policy = load_base_policy(path)  # a plain model directory (MODEL), no manifest to verify
        elif read_manifest(path).kind == "lora":
            if base is None:
                raise EngineNotReady("a LoRA version needs the base model: call load_base first")
            adapter = load_adapter(path, base_model_dir=base.path, tokenizer=base.tokenizer)
            with_adapter = getattr(base_runner, "with_adapter", None)
            runner = with_adapter(adapter.lora.factors, adapter.lora.scaling) if adapter.lora and with_adapter else None
            if runner is not None:
                return self._batch(name, base.model, runner, adapter.tokenizer)
            # Another kind of adapter (or the generic runner): merged into a copy of the layers it
            # touches, the base's other tensors shared.
            policy = load_policy(path, base_model=base.model, base_model_dir=base.path, tokenizer=base.tokenizer)
        else:
            policy = load_policy(path)
        return self._batch(name, policy.model, self._make_runner(policy.model, reuse=base_runner), policy.tokenizer)

    async def _merge(self, version: str, runner: Any) -> None:
        """Fold `version`'s adapter into its weights off the loop and the worker, then have the
        worker use the merged runner from its next step (same results, base speed)."""
        started = time.perf_counter()
        try:
            merged = await asyncio.to_thread(runner.merged)
            if version in self._versions and not self._closed:
                self._commands.put(("set_runner", version, runner, merged))
                log.info("merged the adapter of %s in %.2f s", version, time.perf_counter() - started)
        except asyncio.CancelledError:
            raise
        except Exception:  # it keeps serving unmerged: slower, not wrong
            log.exception("could not merge the adapter of %s; it keeps serving unmerged", version)
        finally:
            if self._merging.get(version) is asyncio.current_task():
                del self._merging[version]

    def _add(self, batch: _Batch, *, make_default: bool) -> None:
        name = batch.name
        self._versions[name] = _Version(name, batch.tokenizer, batch.context_length)
        self._commands.put(("add_version", batch))
        if make_default or self._default is None:
            self._default = name
        log.info("serving version %s%s", name, " (default)" if self._default == name else "")

    def _live(self) -> dict[str, Generation]:
        return self._generations

    def _live_generations(self) -> list[Generation]:
        return list(self._generations.values())

    def _context_length_of(self, record: _Version) -> int:
        return record.context_length

    def _overloaded(self) -> str | None:
        if len(self._generations) >= self.config.max_batch_size + self.config.max_waiting:
            return f"{len(self._generations)} requests are already running or waiting: retry shortly"
        return None

    async def unload_version(self, version: str, *, timeout: float | None = None) -> None:
        await self._drain_and_forget(version, timeout)
        merging = self._merging.pop(version, None)
        if merging is not None:
            merging.cancel()
        self._commands.put(("drop_version", version))
        log.info("unloaded version %s", version)

    def stats(self) -> EngineStats:
        with self._stats_lock:
            return self._stats.copy()

    def _require_default(self) -> _Version:
        if self._default is None:
            raise EngineNotReady("no model is loaded yet")
        return self._versions[self._default]

    # ------------------------------------------------------------------ requests (loop side)

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams = SamplingParams(),
        *,
        version: str | None = None,
        request_id: str | None = None,
    ) -> Generation:
        if not self.ready:
            raise EngineNotReady("the model is not loaded yet" if not self._closed else "the engine is closed")
        record, params, context_length, request_id = self._submitting(prompt, params, version, request_id)
        prompt_ids = [int(t) for t in prompt.token_ids]
        generation = Generation(self, request_id, record.name, len(prompt_ids), params)
        self._generations[request_id] = generation
        self._count_in(record)
        sequence = _Sequence(
            generation=generation,
            version=record.name,
            prompt_ids=prompt_ids,
            temperature=params.temperature,
            top_p=params.top_p,
            max_new_tokens=min(params.max_new_tokens, context_length - len(prompt_ids)),
            detokenizer=IncrementalDetokenizer(record.tokenizer),
        )
        self._commands.put(("submit", sequence))
        return generation

    def _cancel(self, generation: Generation) -> None:
        if generation.request_id in self._generations:
            self._commands.put(("cancel", generation.request_id))

    def _deliver(self, events: list[tuple[Generation, TokenEvent | FinalEvent]]) -> None:
        """On the loop: hand events to their generations; account for finished ones."""
        for generation, event in events:
            generation._push(event)
            if isinstance(event, FinalEvent) and self._generations.pop(generation.request_id, None):
                self._count_out(generation)

    # ------------------------------------------------------------------ the worker thread

    def _worker(self) -> None:
        log.info("local engine worker started (%d torch threads)", torch.get_num_threads())
        try:
            with torch.inference_mode():
                while self._apply_commands(block=not self._has_work()):
                    for batch in list(self._batches.values()):
                        if batch.has_work():
                            self._step(batch)
                    self._flush()
        except Exception:  # a bug, not a request's failure: fail everything loudly
            log.exception("local engine worker crashed")
            for batch in self._batches.values():
                for sequence in [*batch.waiting, *batch.prefilling, *batch.decoding]:
                    self._finish(sequence, "error", error="the engine's worker crashed; see the server log")
            self._flush()
            self._closed = True
        finally:
            self._batches.clear()
            log.info("local engine worker stopped")

    def _has_work(self) -> bool:
        return any(batch.has_work() for batch in self._batches.values())

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False once told to stop."""
        while True:
            try:
                command = self._commands.get(block=block, timeout=None)
            except queue.Empty:
                return True
            block = False
            kind = command[0]
            if kind == "stop":
                for sequence in list(self._sequences.values()):
                    self._remove(sequence)
                    self._finish(sequence, "cancelled")
                self._flush()
                return False
            if kind == "submit":
                sequence = command[1]
                batch = self._batches.get(sequence.version)
                if batch is None:  # cannot happen: versions are dropped only once drained
                    self._finish(sequence, "error", error=f"version {sequence.version} is not loaded")
                    continue
                self._sequences[sequence.request_id] = sequence
                batch.waiting.append(sequence)
            elif kind == "cancel":
                sequence = self._sequences.get(command[1])
                if sequence is not None:
                    self._remove(sequence)
                    self._finish(sequence, "cancelled")
            elif kind == "add_version":
                batch = command[1]
                self._batches[batch.name] = batch
            elif kind == "set_runner":
                _, name, old, new = command
                batch = self._batches.get(name)
                if batch is not None and batch.runner is old:
                    batch.runner = new
            elif kind == "drop_version":
                batch = self._batches.pop(command[1], None)
                for sequence in [*batch.waiting, *batch.prefilling, *batch.decoding] if batch else []:
                    self._remove(sequence)
                    self._finish(sequence, "cancelled")
            self._update_gauges()

    def _step(self, batch: _Batch) -> None:
        try:
            self._admit(batch)
            if batch.prefilling:
                self._prefill(batch)
                self._flush()  # first tokens out before the decode forward
            if batch.decoding:
                self._decode(batch)
            if not batch.active and batch.cache.oversized:
                batch.release_cache()  # a burst's memory goes back, and the prefixes it held
        except Exception as error:  # e.g. out of memory in a forward: fail this batch, keep serving
            # (A forward runs every row at once and has already written the KV cache of some
            # layers: no row can be kept. Per-row failures are caught in _sample/_accept_token.)
            log.exception("generation failed on version %s", batch.name)
            for sequence in [*batch.prefilling, *batch.decoding]:
                self._remove(sequence)
                self._finish(sequence, "error", error=f"{type(error).__name__}: {error}")
            batch.resident.clear()  # what a failed forward half-wrote is trusted by no one
        self._update_gauges()

    def _admit(self, batch: _Batch) -> None:
        total_active = sum(b.active for b in self._batches.values())
        while batch.waiting and total_active < self.config.max_batch_size:
            sequence = batch.waiting.popleft()
            sequence.row, sequence.cached = batch.take_row(sequence.prompt_ids, self.config.reuse_prefixes)
            if sequence.cached:
                with self._stats_lock:
                    self._stats.reused_prompt_tokens += sequence.cached
            sequence.state = "prefilling"
            batch.occupant[sequence.row] = sequence
            batch.prefilling.append(sequence)
            total_active += 1

    def _prefill(self, batch: _Batch) -> None:
        """Run the next prompt chunks of the oldest prefilling sequences (one forward)."""
        budget = self.config.max_prefill_tokens
        group, chunks = [], []
        for sequence in batch.prefilling:
            chunk = min(len(sequence.prompt_ids) - sequence.cached, budget)
            width = max([chunk, *chunks])
            if group and (len(group) + 1) * width > budget:
                break
            group.append(sequence)
            chunks.append(chunk)
        width = max(chunks)
        kv_length = max(s.cached + c for s, c in zip(group, chunks))
        batch.cache.reserve(batch.cache.rows, kv_length)

        # Left padding puts every row's last token in the last column (logits_to_keep=1).
        input_ids = torch.zeros((len(group), width), dtype=torch.long)
        positions = torch.zeros((len(group), width), dtype=torch.long)
        writes = torch.full((len(group), width), batch.cache.sink, dtype=torch.long)
        for i, (sequence, chunk) in enumerate(zip(group, chunks)):
            pad = width - chunk
            start = sequence.cached
            input_ids[i, pad:] = torch.tensor(sequence.prompt_ids[start : start + chunk])
            positions[i, pad:] = torch.arange(start, start + chunk)
            writes[i, pad:] = positions[i, pad:]
        rows = torch.tensor([s.row for s in group])
        step_cache = batch.cache.prefill_view(rows, writes, kv_length)
        # Each query sees the positions up to its own; a padding query sees position 0 only.
        mask = torch.arange(kv_length)[None, None, :] <= positions[:, :, None]
        logits = self._forward(batch, input_ids, positions, mask[:, None], step_cache)

        with self._stats_lock:
            self._stats.prefill_batch_sizes[len(group)] += 1
            self._stats.prefill_tokens += sum(chunks)
        done = []
        for i, (sequence, chunk) in enumerate(zip(group, chunks)):
            sequence.cached += chunk
            if sequence.cached == len(sequence.prompt_ids):
                done.append(i)
        if not done:
            return
        tokens = self._sample(logits[done], [group[i] for i in done])
        for i, token in zip(done, tokens):
            sequence = group[i]
            batch.prefilling.remove(sequence)
            if self._accept_token(batch, sequence, token):
                self._start_decoding(batch, sequence)
            else:
                self._release_row(batch, sequence)

    def _decode(self, batch: _Batch) -> None:
        """One token for every decoding row of this version (one forward)."""
        decoding = batch.decoding
        n = len(decoding)
        positions = torch.tensor([s.cached for s in decoding])
        kv_length = int(positions.max()) + 1
        batch.cache.reserve(batch.cache.rows, kv_length)
        input_ids = torch.tensor([[s.generated[-1]] for s in decoding])
        step_cache = batch.cache.decode_view(n, positions, kv_length)
        mask = torch.arange(kv_length)[None, :] <= positions[:, None]
        logits = self._forward(batch, input_ids, positions[:, None], mask[:, None, None], step_cache)
        with self._stats_lock:
            self._stats.decode_batch_sizes[n] += 1
        tokens = self._sample(logits, decoding)
        finished = []
        for sequence, token in zip(list(decoding), tokens):
            sequence.cached += 1
            if not self._accept_token(batch, sequence, token):
                finished.append(sequence)
        for sequence in sorted(finished, key=lambda s: s.row, reverse=True):
            self._remove(sequence)

    def _forward(self, batch: _Batch, input_ids, positions, mask, step_cache) -> torch.Tensor:
        return batch.runner.forward(input_ids, positions, mask, step_cache)

    def _sample(self, logits: torch.Tensor, sequences: list[_Sequence]) -> list[int | None]:
        """The next token of each row, sampled for the whole batch at once. Should that fail,
        each row is sampled alone, so the row at fault gets None (its sequence then ends with
        an error, in _accept_token) and every other row its token: one request's parameters
        can never fail the batch."""
        try:
            return self._sample_rows(logits, sequences)
        except Exception:  # noqa: BLE001 - find the rows at fault; the others go on
            log.warning("sampling the batch failed: sampling its %d rows one by one", len(sequences),
                        exc_info=True)
        tokens: list[int | None] = []
        for i, sequence in enumerate(sequences):
            try:
                tokens.extend(self._sample_rows(logits[i : i + 1], [sequence]))
            except Exception:  # noqa: BLE001 - this row's failure ends this row
                log.exception("sampling failed for request %s (temperature %r, top_p %r)",
                              sequence.request_id, sequence.temperature, sequence.top_p)
                tokens.append(None)
        return tokens

    def _sample_rows(self, logits: torch.Tensor, sequences: list[_Sequence]) -> list[int]:
        return sample_tokens(
            logits, [s.temperature for s in sequences], [s.top_p for s in sequences], self._generator
        )

    def _accept_token(self, batch: _Batch, sequence: _Sequence, token: int | None) -> bool:
        """Record a generated token and stream its text; False when the sequence is finished.
        A row whose token could not be picked (None), or whose text cannot be decoded, ends
        here with an error, alone."""
        if token is None:
            self._finish(sequence, "error", error="no next token could be sampled for this request")
            return False
        try:
            return self._take_token(batch, sequence, token)
        except Exception:  # noqa: BLE001 - e.g. the detokenizer: fail this row, not the batch
            log.exception("request %s failed on token %d", sequence.request_id, token)
            self._finish(sequence, "error", error="this request's answer could not be decoded")
            return False

    def _take_token(self, batch: _Batch, sequence: _Sequence, token: int) -> bool:
        sequence.generated.append(token)
        with self._stats_lock:
            self._stats.generated_tokens += 1
        if token in batch.stop_ids:
            self._finish(sequence, "stop")
            return False
        text = sequence.detokenizer.push(token)
        if text:
            self._emit(sequence, TokenEvent(text, len(sequence.generated)))
        if len(sequence.generated) >= sequence.max_new_tokens:
            self._finish(sequence, "length")
            return False
        return True

    def _start_decoding(self, batch: _Batch, sequence: _Sequence) -> None:
        """Move a prefilled sequence to row len(decoding), keeping decoding rows dense."""
        target = len(batch.decoding)
        if sequence.row != target:
            other = batch.occupant.get(target)
            if other is not None:  # a sequence still prefilling: swap the two rows
                batch.cache.swap_rows(sequence.row, target, sequence.cached, other.cached)
                other.row, batch.occupant[sequence.row] = sequence.row, other
            elif target in batch.resident:  # a free row holding a prefix: it moves, not lost
                held = batch.resident.pop(target)
                batch.cache.swap_rows(sequence.row, target, sequence.cached, len(held.tokens))
                del batch.occupant[sequence.row]
                batch.leave_row(sequence.row, held)
            else:
                batch.cache.copy_row(sequence.row, target, sequence.cached)
                del batch.occupant[sequence.row]
                batch.leave_row(sequence.row, _held_by(sequence))
            sequence.row = target
            batch.occupant[target] = sequence
        sequence.state = "decoding"
        batch.decoding.append(sequence)

    def _remove(self, sequence: _Sequence) -> None:
        """Take a sequence out of its batch, freeing its row."""
        batch = self._batches.get(sequence.version)
        if batch is None:
            return
        if sequence.state == "waiting":
            if sequence in batch.waiting:
                batch.waiting.remove(sequence)
        elif sequence.state == "prefilling":
            if sequence in batch.prefilling:
                batch.prefilling.remove(sequence)
            self._release_row(batch, sequence)
        elif sequence.state == "decoding":
            last = batch.decoding.pop()
            if last is not sequence:  # fill the hole with the last row: rows stay [0, n)
                # (swapped, not copied: the freed row keeps this sequence's keys and values)
                batch.cache.swap_rows(last.row, sequence.row, last.cached, sequence.cached)
                batch.decoding[sequence.row] = last
                batch.occupant[sequence.row] = last
                last.row, sequence.row = sequence.row, last.row
            del batch.occupant[sequence.row]
            batch.leave_row(sequence.row, _held_by(sequence))
            sequence.row = -1
        sequence.state = "finished"

    def _release_row(self, batch: _Batch, sequence: _Sequence) -> None:
        if batch.occupant.get(sequence.row) is sequence:
            del batch.occupant[sequence.row]
            batch.leave_row(sequence.row, _held_by(sequence))
        sequence.row = -1
        sequence.state = "finished"

    def _finish(self, sequence: _Sequence, reason: str, error: str | None = None) -> None:
        """Emit the sequence's final event (once). Its row is freed separately (_remove)."""
        if sequence.reported:
            return
        sequence.reported = True
        self._sequences.pop(sequence.request_id, None)
        if reason in ("stop", "length"):
            tail = sequence.detokenizer.flush()
            if tail:
                self._emit(sequence, TokenEvent(tail, len(sequence.generated)))
        usage = Usage(prompt_tokens=len(sequence.prompt_ids), completion_tokens=len(sequence.generated))
        self._emit(sequence, FinalEvent(reason, usage, error))
        with self._stats_lock:
            self._stats.finished[reason] += 1

    def _emit(self, sequence: _Sequence, event: TokenEvent | FinalEvent) -> None:
        self._outbox.append((sequence.generation, event))

    def _flush(self) -> None:
        if self._outbox and self._loop is not None and not self._loop.is_closed():
            events, self._outbox = self._outbox, []
            self._loop.call_soon_threadsafe(self._deliver, events)

    def _update_gauges(self) -> None:
        with self._stats_lock:
            self._stats.active = sum(b.active for b in self._batches.values())
            self._stats.waiting = sum(len(b.waiting) for b in self._batches.values())


# ---------------------------------------------------------------------- model introspection


def _held_by(sequence: _Sequence) -> _Held:
    """What the sequence's row holds: its prompt, then what it generated (the last sampled token
    is never fed back, so it is not among them), as far as it got."""
    return _Held((sequence.prompt_ids + sequence.generated)[: sequence.cached], len(sequence.prompt_ids))


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _stop_token_ids(model: Any, tokenizer: Any) -> frozenset[int]:
    """Every id that ends the assistant's turn: the model's EOS ids and end-of-turn tokens."""
    ids: set[int] = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if isinstance(eos, int):
            ids.add(eos)
        elif isinstance(eos, (list, tuple)):
            ids.update(int(i) for i in eos)
    vocab = tokenizer.get_vocab()
    ids.update(vocab[token] for token in END_OF_TURN_TOKENS if token in vocab)
    return frozenset(ids)


def _context_length(model: Any, configured: int) -> int:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    native = getattr(config, "max_position_embeddings", None) or configured
    return min(configured, native)


def _runner_kind(runner: Any) -> str:
    if getattr(runner, "adapted", False):
        return "adapter applied on the fly to the shared base weights"
    return f"{runner.name} runner"


def _prefer_sdpa(model: Any) -> None:
    """Boolean 4D masks suit sdpa; other attention implementations get additive float masks."""
    if getattr(model.config, "_attn_implementation", None) != "sdpa":
        try:
            model.set_attn_implementation("sdpa")
        except Exception:  # noqa: BLE001 - the model keeps its own; _forward adapts the mask
            log.info("model keeps attention %s", model.config._attn_implementation)


async def start_local_engine(model_dir: str | Path, config: LocalEngineConfig = LocalEngineConfig()) -> LocalEngine:
    """A started engine serving the base model at `model_dir` as its default version."""
    engine = LocalEngine(config)
    await engine.start()
    try:
        await engine.load_base(model_dir)
    except BaseException:
        await engine.close()
        raise
    return engine
