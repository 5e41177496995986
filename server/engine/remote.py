"""The remote engine: generation on another server (TGI, vLLM, SGLang, `transformers serve`)
through huggingface_hub's `AsyncInferenceClient`, streamed.

Prompts are still built here, with the local tokenizer of the model the remote serves
(`ENGINE_TOKENIZER`, else the `MODEL` directory): cut to the token budget exactly as for the
local engine, then sent in one of two API flavours (`ENGINE_API`):

- `openai` (default): `POST /v1/chat/completions` with the kept messages; the remote renders
  them with its own copy of the chat template. vLLM, SGLang, `transformers serve` and TGI's
  Messages API all speak it, and it is the only flavour that names a model per request, so
  versions are served model names (vLLM LoRA adapters, `--served-model-name`, the repository
  ids of `transformers serve`), checked against `GET /v1/models`.
- `tgi`: TGI's own `POST /` (`generate_stream`) with the rendered prompt text and
  `details=True`, so every streamed token carries its id and the end its exact counts. Use it
  for TGI when the remote must see exactly the text rendered here; versions are TGI LoRA
  adapter ids (`adapter_id`), the base version sends none. TGI lists no adapters, so they are
  not checked before use.

Failures, documented once here:
- Known down (the last health probe failed, or a request could not connect since):
  `submit` raises `EngineNotReady` naming the URL, and a new probe starts at once.
- Failing during a request (connection refused or dropped, timeout, an HTTP or stream error):
  the request ends with a FinalEvent(finish_reason="error") whose `error` names the URL and
  what to check; the tokens already streamed stay streamed.
`ready` is the last probe's answer: `GET /health` (every one of these servers has it), then
`GET /v1/models` where offered, which must list the default version's served name.

Cancelling (`Generation.cancel`, leaving the iteration early) ends the stream at once with
"cancelled" and closes the HTTP response, which is how these servers learn to stop generating.

Blue/green: `switch_endpoint(url)` probes a second engine, makes it the endpoint for new
requests, and lets the streams in flight finish on the old one (each request holds its own
endpoint); the old connections are closed once the last of them ends. The server calls it when
the registry asks (`python -m deploy engine-url`, server/swap.py).

Runtime LoRA loading (`lora_loading="vllm"`, ENGINE_LORA_LOADING): before a LoRA checkpoint
becomes a version, the remote is asked to load it under the checkpoint id (vLLM's admin API:
server/engine/remote_lora.py); a refused load refuses the version (AdapterNotLoaded) and
nothing changes. A switch to another endpoint loads the versions' adapters there before
checking it. With `unload_lora`, an adapter is unloaded once its version is unloaded here; only
safe when no other replica still streams from it (one replica per engine, or replicas that
drain together).

Beside this module: server/engine/remote_http.py (the endpoint: connection pool, health probe,
model listing, per-request clients, how failures are described) and remote_lora.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from deploy.checkpoint import base_model_name

from ..prompt import Prompt
from .base import (
    EngineNotReady,
    EngineStats,
    FinalEvent,
    FinishReason,
    Generation,
    SamplingLimits,
    SamplingParams,
    TokenEvent,
    Usage,
    VersionedEngine,
    VersionRecord,
)
from .remote_http import (
    AdapterNotLoaded,
    Endpoint,
    ModelNotServed,
    RemoteEngineError,
    RequestClient,
    describe_failure,
)
from .remote_lora import adapter_path as adapter_path_for
from .remote_lora import engine_path, load_adapter, unload_adapter

if TYPE_CHECKING:
    from ..settings import ServerSettings

log = logging.getLogger(__name__)

__all__ = [
    "AdapterNotLoaded", "ModelNotServed", "RemoteEngine", "RemoteEngineConfig", "RemoteEngineError",
    "RemoteGeneration", "engine_path", "load_remote_engine", "model_context_length", "start_remote_engine",
]

Api = Literal["openai", "tgi"]

# How the servers name the ends of an answer, mapped onto ours. TGI says eos_token /
# stop_sequence (its Messages API too, in older releases); anything else that ends an answer on
# purpose (tool_calls, content_filter) is a stop as far as a chat turn goes.
_LENGTH_REASONS = {"length", "max_tokens"}


@dataclass(frozen=True)
class RemoteEngineConfig:
    url: str  # the remote's base URL, with or without a trailing /v1
    api: Api = "openai"
    served_model: str | None = None  # the name the remote serves the base model under; None: the only one it lists
    api_key: str | None = None  # sent as a bearer token (vLLM --api-key, a gateway's key)
    connect_timeout_s: float = 5.0  # to open a connection
    read_timeout_s: float = 120.0  # longest silence mid-request: time to first token included
    health_interval_s: float = 5.0  # between health probes of the current endpoint
    drain_timeout_s: float | None = 600.0  # after a switch: streams still on the old endpoint then are cancelled
    context_length: int = 2048  # prompt + answer budget (capped by the model's and the remote's own)
    max_in_flight: int = 512  # requests streaming at once before submit says overloaded
    limits: SamplingLimits = SamplingLimits()
    lora_loading: Literal["none", "vllm"] = "none"  # vllm: load LoRA checkpoints into the remote at run time
    lora_path_map: tuple[tuple[str, str], ...] = ()  # (server path prefix, the remote's path for it)
    unload_lora: bool = False  # vllm: unload an adapter from the remote once its version is unloaded here


@dataclass
class _Version(VersionRecord):
    """Loop-side record of a registered version: the name the remote serves it under."""

    served_name: str | None  # openai: the `model` field; tgi: the adapter id (None: the base)
    adapter_path: str | None = None  # where the remote loads its LoRA adapter from (lora_loading only)


class RemoteGeneration(Generation):
    """A Generation that also says which remote serves it (`url`), for logs and blue/green."""

    def __init__(self, *args: Any, url: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.url = url


@dataclass
class _Request:
    generation: RemoteGeneration
    endpoint: Endpoint
    prompt: Prompt
    served_name: str | None
    max_new_tokens: int
    pieces: list[str] = field(default_factory=list)
    chunks: int = 0  # content chunks (openai) or tokens (tgi) received
    task: asyncio.Task | None = None
    finished: bool = False


class RemoteEngine(VersionedEngine):
    """See the module docstring. Construct, `await start()`; `load_remote_engine` does both
    from the server's settings."""

    def __init__(self, config: RemoteEngineConfig, tokenizer: Any, *, base_version: str,
                 model_context_length: int | None = None):
        self.config = config
        self._tokenizer = tokenizer
        self._model_context_length = model_context_length  # the model's own (its config's)
        self._endpoint = Endpoint(config.url, config)
        self._retired: set[Endpoint] = set()  # old endpoints draining after a switch
        self._base_version = base_version
        # The name the remote serves the base under (learned from the listing when not given);
        # kept here, as the base version itself may be unloaded after a promotion and come back.
        self._base_served: str | None = config.served_model if config.api == "openai" else None
        self._versions: dict[str, _Version] = {base_version: _Version(base_version, self._base_served)}
        self._default = base_version
        self._requests: dict[str, _Request] = {}
        self._stats = EngineStats()
        self._started = False
        self._closed = False
        self._health_task: asyncio.Task | None = None
        self._probe_task: asyncio.Task | None = None
        self._background: set[asyncio.Task] = set()

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        """Probe the remote once and keep probing it. A remote that is down does not fail the
        start: the server comes up not ready and becomes ready when the remote answers."""
        if self._started:
            return
        if self._closed:
            raise EngineNotReady("this remote engine was closed; create a new one")
        self._started = True
        await self._probe()
        self._health_task = asyncio.create_task(self._health_loop(), name="remote-engine-health")

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for task in (self._health_task, self._probe_task):
            if task is not None:
                task.cancel()
        for request in list(self._requests.values()):
            request.generation.cancel()
        for task in self._background:
            task.cancel()
        endpoints = (self._endpoint, *self._retired)
        tasks = [task for endpoint in endpoints for task in endpoint.tasks] + list(self._background)
        await asyncio.gather(*tasks, return_exceptions=True)
        for endpoint in (self._endpoint, *self._retired):
            await endpoint.close()
        self._retired.clear()

    @property
    def ready(self) -> bool:
        return self._started and not self._closed and bool(self._endpoint.healthy)

    @property
    def url(self) -> str:
        """The endpoint new requests go to."""
        return self._endpoint.url

    @property
    def problem(self) -> str | None:
        """Why the engine is not ready (None when it is)."""
        if self._closed:
            return "the remote engine is closed"
        if not self._started:
            return "the remote engine is not started"
        if not self._endpoint.healthy:
            return f"the remote engine at {self._endpoint.url} is not usable: {self._endpoint.problem or 'not probed yet'}"
        return None

    def draining_urls(self) -> list[str]:
        """Old endpoints still finishing streams after a switch."""
        return [endpoint.url for endpoint in self._retired]

    def open_streams(self) -> int:
        """HTTP streams still open to remotes. A request's closes just after its final event
        (a cancelled one's is what tells the remote to stop)."""
        return sum(len(endpoint.tasks) for endpoint in (self._endpoint, *self._retired))

    # ------------------------------------------------------------------ health

    async def _health_loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval_s)
            try:
                await self._probe()
            except Exception:  # noqa: BLE001 - a bug in one probe must not end the probing
                log.exception("probing the remote engine at %s failed", self._endpoint.url)

    async def _probe(self) -> bool:
        endpoint = self._endpoint
        if not await endpoint.probe():
            return False
        problem = self._check_served(endpoint, every_version=False)
        if problem:
            endpoint.mark_down(problem)
            return False
        return True

    def _kick_probe(self) -> None:
        """Probe now (in the background) rather than at the next interval: after a failure, so
        that a remote which is back is used again without waiting."""
        if self._started and not self._closed and (self._probe_task is None or self._probe_task.done()):
            self._probe_task = asyncio.create_task(self._probe(), name="remote-engine-probe")

    def _check_served(self, endpoint: Endpoint, *, every_version: bool) -> str | None:
        """What is wrong with the served names on `endpoint`, if anything: the default
        version's only (health: a missing extra version fails its own requests, not the
        engine), or every version's (a switch must not lose one). Learns the base model's name
        from the listing when ENGINE_MODEL is not set and the choice is clear."""
        if self.config.api != "openai":
            return None
        listed = endpoint.listed
        if self._base_served is None:
            if listed is None:
                return ("it lists no models (GET /v1/models), so the base model's served name is unknown: "
                        "set ENGINE_MODEL to the name the remote serves it under")
            if len(listed) != 1:
                names = ", ".join(sorted(listed)) or "none"
                return (f"it lists {len(listed)} models ({names}): set ENGINE_MODEL to the one that "
                        "serves the base model")
            self._base_served = next(iter(listed))
            if (base := self._versions.get(self._base_version)) is not None:
                base.served_name = self._base_served
            log.info("remote engine at %s serves the base model as %r", endpoint.url, self._base_served)
        checked = self._versions.values() if every_version else [self._versions[self._default]]
        for version in checked:
            if listed is not None and version.accepting and version.served_name not in listed:
                names = ", ".join(sorted(listed)) or "none"
                return f"it does not serve {version.served_name!r} (version {version.name}); it lists: {names}"
        return None

    # ------------------------------------------------------------------ versions

    @property
    def tokenizer(self) -> Any:
        return self._tokenizer

    @property
    def context_length(self) -> int:
        lengths = [self.config.context_length]
        if self._model_context_length:
            lengths.append(self._model_context_length)
        listed = self._endpoint.listed or {}
        served = self._versions[self._default].served_name
        remote_max = (listed.get(served) or {}).get("max_model_len")  # vLLM says what it allocated
        if isinstance(remote_max, int) and remote_max > 0:
            lengths.append(remote_max)
        return min(lengths)

    @property
    def default_version(self) -> str:
        return self._default

    async def load_version(self, version: str, path: str | Path, *, make_default: bool = False,
                           served_name: str | None = None) -> None:
        """Serve `version`, which the remote serves as `served_name` (default: `version`; the
        base version: its served name again).

        With `lora_loading="vllm"` a LoRA checkpoint at `path` is loaded into the remote first
        (AdapterNotLoaded if it refuses). Otherwise nothing is loaded here: the remote must
        already serve it (vLLM: `--lora-modules`; TGI: `LORA_ADAPTERS`; `path` is for the log).
        With the OpenAI API the remote's model list must name it, else ModelNotServed. Either
        way a refusal changes nothing."""
        if version in self._versions:
            raise ValueError(f"version {version!r} is already registered; unload it first or use another id")
        is_base = version == self._base_version
        served = served_name or (self._base_served if is_base else version)
        adapter_path = None if is_base else await asyncio.to_thread(adapter_path_for, self.config, path)
        endpoint = self._endpoint
        if self.config.api == "openai":
            if not await endpoint.probe():
                raise EngineNotReady(f"cannot check version {version}: {self.problem}")
            if adapter_path is not None:
                await load_adapter(endpoint, served, adapter_path)
            if endpoint.listed is not None and served not in endpoint.listed:
                names = ", ".join(sorted(endpoint.listed)) or "none"
                raise ModelNotServed(
                    f"the remote engine at {endpoint.url} does not serve {served!r} (it lists: {names}): "
                    "load the checkpoint there first (vLLM: --lora-modules NAME=PATH, POST "
                    "/v1/load_lora_adapter, or ENGINE_LORA_LOADING=vllm), then load the version again"
                )
        self._versions[version] = _Version(version, served, adapter_path)
        if make_default:
            self._default = version
        log.info("serving version %s as %r on %s (checkpoint %s)%s", version, served, endpoint.url, path,
                 " (default)" if make_default else "")

    def _live(self) -> dict[str, _Request]:
        return self._requests

    def _live_generations(self) -> list[Generation]:
        return [request.generation for request in self._requests.values()]

    def _context_length_of(self, record: _Version) -> int:
        return self.context_length  # the default version's: the remote allocates one for all

    def _overloaded(self) -> str | None:
        if len(self._requests) >= self.config.max_in_flight:
            return f"{len(self._requests)} requests are already streaming from the remote engine: retry shortly"
        return None

    async def unload_version(self, version: str, *, timeout: float | None = None) -> None:
        record = self._versions.get(version)
        await self._drain_and_forget(version, timeout)
        log.info("unregistered version %s", version)
        if self.config.unload_lora and record is not None and record.adapter_path is not None:
            await unload_adapter(self._endpoint, record.served_name)

    # ------------------------------------------------------------------ blue/green

    async def switch_endpoint(self, url: str, *, drain_timeout: float | None = None) -> bool:
        """Send new requests to the engine at `url`; streams in flight finish where they are.
        True once switched; False when `url` is the endpoint already.

        The new endpoint must answer its health probe and, where it lists models, serve every
        registered version (with runtime LoRA loading, their adapters are loaded there first);
        otherwise RemoteEngineError and nothing changes. The old endpoint's connections close
        once its last stream ends, or after `drain_timeout` seconds (default
        ENGINE_DRAIN_TIMEOUT) by cancelling what is left."""
        if self._closed:
            raise EngineNotReady("this remote engine was closed")
        new = Endpoint(url, self.config)
        if new.url == self._endpoint.url:
            await new.close()
            return False
        problem = None if await new.probe() else new.problem
        if problem is None and self.config.api == "openai":
            try:
                for version in list(self._versions.values()):
                    if version.accepting and version.adapter_path is not None:
                        await load_adapter(new, version.served_name, version.adapter_path)
            except AdapterNotLoaded as error:
                problem = str(error)
        problem = problem or self._check_served(new, every_version=True)
        if problem:
            await new.close()
            raise RemoteEngineError(f"not switching to the remote engine at {new.url}: {problem}; "
                                    f"still serving from {self._endpoint.url}")
        old, self._endpoint = self._endpoint, new
        self._retired.add(old)
        log.info("remote engine switched from %s to %s; %d streams draining there", old.url, new.url, len(old.tasks))
        timeout = self.config.drain_timeout_s if drain_timeout is None else drain_timeout
        self._spawn(self._retire(old, timeout), name=f"remote-engine-drain {old.url}")
        return True

    async def _retire(self, endpoint: Endpoint, timeout: float | None) -> None:
        try:
            if endpoint.tasks:
                _, pending = await asyncio.wait(set(endpoint.tasks), timeout=timeout)
                if pending:
                    log.warning("%s: cancelling %d streams still running after %s s", endpoint.url, len(pending), timeout)
                    for request in list(self._requests.values()):
                        if request.endpoint is endpoint:
                            request.generation.cancel()
                    await asyncio.gather(*pending, return_exceptions=True)
        finally:
            self._retired.discard(endpoint)
            await endpoint.close()
            log.info("remote engine at %s drained and closed", endpoint.url)

    def _spawn(self, coroutine: Any, *, name: str) -> None:
        task = asyncio.create_task(coroutine, name=name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ requests

    def stats(self) -> EngineStats:
        stats = self._stats.copy()
        stats.active = len(self._requests)
        return stats

    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams = SamplingParams(),
        *,
        version: str | None = None,
        request_id: str | None = None,
    ) -> Generation:
        if not self.ready:
            if not self._closed:
                self._kick_probe()
            raise EngineNotReady(self.problem or "the remote engine is not ready")
        record, params, context_length, request_id = self._submitting(prompt, params, version, request_id)
        n_prompt = len(prompt.token_ids)
        endpoint = self._endpoint
        generation = RemoteGeneration(self, request_id, record.name, n_prompt, params, url=endpoint.url)
        request = _Request(generation, endpoint, prompt, record.served_name,
                           max_new_tokens=min(params.max_new_tokens, context_length - n_prompt))
        self._requests[request_id] = request
        self._count_in(record)
        request.task = asyncio.create_task(self._run(request), name=f"remote-engine {request_id}")
        endpoint.tasks.add(request.task)
        request.task.add_done_callback(lambda _task: self._closed_stream(request))
        return generation

    def _cancel(self, generation: Generation) -> None:
        request = self._requests.get(generation.request_id)
        if request is None or request.finished:
            return
        # The final event now, not when the connection is closed: cancelling must be prompt
        # for the client even while the remote is slow to hang up.
        self._finish(request, "cancelled")
        if request.task is not None:
            request.task.cancel()

    def _closed_stream(self, request: _Request) -> None:
        """When a request's task is over, its HTTP response is closed."""
        request.endpoint.tasks.discard(request.task)
        if not request.finished:  # _run always finishes first; this keeps the client's promise anyway
            self._finish(request, "error", error="the remote engine's request ended without a result")

    async def _run(self, request: _Request) -> None:
        endpoint = request.endpoint
        client = endpoint.client(request.generation.request_id)
        try:
            if self.config.api == "openai":
                reason, usage = await self._stream_openai(request, client)
            else:
                reason, usage = await self._stream_tgi(request, client)
            self._finish(request, reason, usage=usage)
        except asyncio.CancelledError:
            self._finish(request, "cancelled")
            raise
        except Exception as error:  # noqa: BLE001 - every failure ends this request, never the engine
            message = self._describe_failure(endpoint, error)
            log.warning("request %s failed: %s", request.generation.request_id, message)
            self._finish(request, "error", error=message)
        finally:
            await client.close()  # closes this request's response: a remote still generating stops

    async def _stream_openai(self, request: _Request, client: RequestClient) -> tuple[FinishReason, Usage | None]:
        params = request.generation.params
        stream = await client.chat_completion(
            [dict(message) for message in request.prompt.messages],
            model=request.served_name,
            stream=True,
            max_tokens=request.max_new_tokens,
            temperature=params.temperature,
            top_p=None if params.greedy else params.top_p,
            # vLLM and SGLang send usage in a stream only when asked; the others ignore this.
            stream_options={"include_usage": True},
        )
        finish: str | None = None
        usage = None
        async for chunk in stream:
            if chunk.usage is not None:
                usage = Usage(prompt_tokens=chunk.usage.prompt_tokens, completion_tokens=chunk.usage.completion_tokens)
            for choice in chunk.choices or []:
                if choice.index != 0:
                    continue
                if choice.delta is not None and choice.delta.content:
                    request.chunks += 1
                    self._emit_text(request, choice.delta.content)
                if choice.finish_reason:
                    finish = choice.finish_reason
        return _finish_reason(finish), usage

    async def _stream_tgi(self, request: _Request, client: RequestClient) -> tuple[FinishReason, Usage | None]:
        params = request.generation.params
        prompt_text = self._tokenizer.apply_chat_template(
            [dict(message) for message in request.prompt.messages], add_generation_prompt=True, tokenize=False
        )
        stream = await client.text_generation(
            prompt_text,
            stream=True,
            details=True,
            adapter_id=request.served_name,
            max_new_tokens=request.max_new_tokens,
            do_sample=not params.greedy,
            # TGI refuses temperature 0 and top_p 1 ("must be strictly positive", "< 1.0").
            temperature=None if params.greedy else params.temperature,
            top_p=None if params.greedy or params.top_p >= 1 else params.top_p,
            return_full_text=False,
        )
        finish: str | None = None
        usage = None
        async for output in stream:
            request.chunks += 1
            if not output.token.special and output.token.text:
                self._emit_text(request, output.token.text)
            if output.details is not None:
                finish = output.details.finish_reason
                usage = Usage(prompt_tokens=output.details.input_length or request.generation.prompt_tokens,
                              completion_tokens=output.details.generated_tokens)
        return _finish_reason(finish), usage

    def _emit_text(self, request: _Request, text: str) -> None:
        if request.finished:
            return
        request.pieces.append(text)
        request.generation._push(TokenEvent(text, request.chunks))

    def _finish(self, request: _Request, reason: FinishReason, *, usage: Usage | None = None,
                error: str | None = None) -> None:
        if request.finished:
            return
        request.finished = True
        usage = usage or self._counted_usage(request, reason)
        request.generation._push(FinalEvent(reason, usage, error))
        self._stats.finished[reason] += 1
        self._stats.generated_tokens += usage.completion_tokens
        self._stats.prefill_tokens += usage.prompt_tokens
        self._requests.pop(request.generation.request_id, None)
        self._count_out(request.generation)

    def _counted_usage(self, request: _Request, reason: FinishReason) -> Usage:
        """Usage when the remote gave none (a cancel, an error, a server that does not send it):
        the answer's text re-tokenized here, plus the stop token a finished answer ends with."""
        text = "".join(request.pieces)
        retokenized = len(self._tokenizer.encode(text, add_special_tokens=False)) if text else 0
        stop_token = 1 if reason == "stop" else 0
        if self.config.api == "tgi":  # one event per token, the stop token's included: exact
            counted = max(retokenized + stop_token, request.chunks)
        else:  # these servers send a chunk per token, and text re-tokenizes into fewer ("\n\n")
            counted = max(retokenized, request.chunks) + stop_token
        return Usage(prompt_tokens=request.generation.prompt_tokens, completion_tokens=counted)

    def _describe_failure(self, endpoint: Endpoint, error: BaseException) -> str:
        message, reprobe = describe_failure(endpoint, error, self.config)
        if reprobe:
            self._kick_probe()
        return message


def _finish_reason(reason: str | None) -> FinishReason:
    if reason is None:
        raise RemoteEngineError("the stream ended without a finish reason (the remote closed it early)")
    return "length" if reason in _LENGTH_REASONS else "stop"


# ---------------------------------------------------------------------- construction


def model_context_length(model_dir: str | Path) -> int | None:
    """The model's own context length, from its config.json (no weights are read)."""
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config)
    value = config.get("max_position_embeddings")
    return value if isinstance(value, int) and value > 0 else None


async def start_remote_engine(tokenizer_dir: str | Path, config: RemoteEngineConfig, *,
                              base_version: str | None = None) -> RemoteEngine:
    """A started remote engine whose prompts are built with the tokenizer at `tokenizer_dir`
    (the model the remote serves). The base version is named like the local engine names it
    (the checkpoint id, else the directory name), so stored messages mean the same policy."""
    engine = await _build(tokenizer_dir, config, base_version)
    await engine.start()
    return engine


async def load_remote_engine(settings: ServerSettings) -> RemoteEngine:
    """The remote engine the server's settings describe (not started: serving.load starts it).
    Every field comes from the settings, whose defaults are the documented ones."""
    from deploy.base_model import resolve_from_settings

    tokenizer_dir = settings.engine_tokenizer or await asyncio.to_thread(resolve_from_settings, settings)
    config = RemoteEngineConfig(
        url=settings.engine_url,
        api=settings.engine_api,
        served_model=settings.engine_model,
        api_key=settings.engine_api_key.get_secret_value() if settings.engine_api_key else None,
        connect_timeout_s=settings.engine_connect_timeout,
        read_timeout_s=settings.engine_read_timeout,
        health_interval_s=settings.engine_health_interval,
        drain_timeout_s=settings.engine_drain_timeout,
        context_length=settings.context_length,
        limits=SamplingLimits(max_temperature=settings.max_temperature, max_new_tokens=settings.max_new_tokens_limit),
        lora_loading=settings.engine_lora_loading,
        lora_path_map=settings.engine_lora_path_pairs,
        unload_lora=settings.engine_lora_unload,
    )
    return await _build(tokenizer_dir, config, None)


async def _build(tokenizer_dir: str | Path, config: RemoteEngineConfig, base_version: str | None) -> RemoteEngine:
    from transformers import AutoTokenizer

    tokenizer_dir = Path(tokenizer_dir)
    if not tokenizer_dir.is_dir():
        raise RemoteEngineError(
            f"the remote engine builds prompts with a local copy of the served model's tokenizer, and "
            f"{tokenizer_dir} is not a directory: set ENGINE_TOKENIZER (or MODEL) to one"
        )
    tokenizer = await asyncio.to_thread(AutoTokenizer.from_pretrained, tokenizer_dir)
    return RemoteEngine(
        config,
        tokenizer,
        base_version=base_version or base_model_name(tokenizer_dir),
        model_context_length=model_context_length(tokenizer_dir),
    )
