"""The engine interface: what the server needs from whatever generates the tokens.

Two engines implement it: `local` (in-process transformers, server/engine/local.py) and
`remote` (a TGI / OpenAI-compatible server through huggingface_hub's AsyncInferenceClient).

A request is submitted with a prompt, sampling params and optionally a model version, and
comes back as a `Generation`: a handle that knows which version it runs on from the start
(the server's `started` frame needs it before any token) and an async stream of events:
`TokenEvent`s (text deltas, as produced) and exactly one `FinalEvent` (finish reason and
usage) at the end. Cancelling is idempotent and always ends the stream with a `FinalEvent`.

Hot swap is part of the interface from the start: an engine holds one or more model versions
at once; every request names (or is given) the version it runs on and finishes on those
weights; `load_version` / `set_default_version` / `unload_version` swap what new requests get
while streams in flight drain on the old one.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field

from ..prompt import Prompt, PromptTooLong

log = logging.getLogger(__name__)

FinishReason = Literal["stop", "length", "cancelled", "error"]

# SmolLM2's recommended sampling (its model card); the server's settings may override them.
DEFAULT_TEMPERATURE = 0.2
DEFAULT_TOP_P = 0.9
DEFAULT_MAX_NEW_TOKENS = 256


class EngineError(RuntimeError):
    """Something an engine refused or failed to do; subclasses say what, messages say how to fix."""


class InvalidSamplingParams(EngineError, ValueError):
    """A sampling parameter is out of range or over a configured limit."""


class UnknownModelVersion(EngineError, LookupError):
    """The request names a model version this engine does not serve (or no longer accepts)."""

    def __init__(self, version: str, served: list[str]):
        super().__init__(f"model version {version!r} is not served here; served: {', '.join(served) or 'none'}")
        self.version = version
        self.served = served


class EngineOverloaded(EngineError):
    """Too many requests are waiting; the client should retry later."""


class EngineNotReady(EngineError):
    """No model is loaded yet, or the engine was closed."""


class VersionInUse(EngineError):
    """A version cannot be unloaded: it is the default one (set another default first)."""


@dataclass(frozen=True)
class SamplingLimits:
    """Bounds on what a request may ask for (from the server's settings)."""

    max_temperature: float = 2.0
    max_new_tokens: int = 1024


# Under this, a temperature or top_p decodes greedily (temperature 0). Dividing float32 logits
# by a temperature that small underflows (1e-300 is 0 in float32: inf/nan probabilities), and
# no real distribution is changed by it: the softmax at T < 1e-5 puts all the mass on the top
# token unless two logits tie to 1e-5. A nucleus under 1e-5 holds only the top token whenever
# the vocabulary has fewer than 100,000 tokens (the top token's probability is at least 1/V).
# vLLM draws the same line (_SAMPLING_EPS).
GREEDY_EPS = 1e-5


class SamplingParams(BaseModel):
    """How to pick tokens: the one type from the wire (websocket `params`, the OpenAI API's
    fields) through the turn logic to the engines. Unset fields take the server's defaults
    (chat.resolve_params) or, given straight to an engine, the model's (DEFAULT_*). Types are
    strict (JSON "4" or true is not a number) and values finite; `checked` adds the limits."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Softmax temperature; 0 (and anything under GREEDY_EPS) is greedy decoding. Unset: the
    # default (SmolLM2: 0.2).
    temperature: float | None = Field(None, ge=0, strict=True, allow_inf_nan=False)
    # Nucleus sampling: sample among the likeliest tokens holding this mass, in (0, 1]. Unset:
    # the default (SmolLM2: 0.9).
    top_p: float | None = Field(None, gt=0, le=1, strict=True, allow_inf_nan=False)
    # Longest answer, in tokens, the stop token included. Unset: the default (256).
    max_new_tokens: int | None = Field(None, gt=0, strict=True)

    def with_defaults(self, temperature: float, top_p: float, max_new_tokens: int) -> SamplingParams:
        """These params with every unset field given the value here."""
        return self.model_copy(update={
            "temperature": temperature if self.temperature is None else self.temperature,
            "top_p": top_p if self.top_p is None else self.top_p,
            "max_new_tokens": max_new_tokens if self.max_new_tokens is None else self.max_new_tokens,
        })

    def checked(self, limits: SamplingLimits = SamplingLimits()) -> SamplingParams:
        """These params with the model's defaults for unset fields, within `limits`, and what
        the engine computes: a temperature or top_p under GREEDY_EPS becomes temperature 0.
        InvalidSamplingParams names the first one out of bounds."""
        p = self.with_defaults(DEFAULT_TEMPERATURE, DEFAULT_TOP_P, DEFAULT_MAX_NEW_TOKENS)
        if not (math.isfinite(p.temperature) and 0 <= p.temperature <= limits.max_temperature):
            raise InvalidSamplingParams(
                f"temperature must be between 0 (greedy) and {limits.max_temperature}, not {p.temperature}"
            )
        if not (math.isfinite(p.top_p) and 0 < p.top_p <= 1):
            raise InvalidSamplingParams(f"top_p must be in (0, 1], not {p.top_p}")
        if isinstance(p.max_new_tokens, bool) or not isinstance(p.max_new_tokens, int):
            raise InvalidSamplingParams(f"max_new_tokens must be an integer, not {p.max_new_tokens!r}")
        if not 1 <= p.max_new_tokens <= limits.max_new_tokens:
            raise InvalidSamplingParams(
                f"max_new_tokens must be between 1 and {limits.max_new_tokens}, not {p.max_new_tokens}"
            )
        if 0 < p.temperature < GREEDY_EPS or p.top_p < GREEDY_EPS:
            p = p.model_copy(update={"temperature": 0.0})
        return p

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Usage(BaseModel):
    """Token counts of one answer (the `usage` of `done` frames and API responses)."""

    model_config = ConfigDict(frozen=True)

    # Tokens in the prompt the model saw (after truncation).
    prompt_tokens: int
    # Tokens generated, the stop token included.
    completion_tokens: int

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@dataclass(frozen=True)
class TokenEvent:
    """New answer text. Several tokens may make one event (or none: a multi-byte character
    split across tokens is held back until it is complete)."""

    text: str
    completion_tokens: int  # generated so far, this event's tokens included


@dataclass(frozen=True)
class FinalEvent:
    """The last event of every generation."""

    finish_reason: FinishReason  # stop: end of turn; length: max_new_tokens or context full
    usage: Usage
    error: str | None = None  # set when finish_reason is "error"


Event = TokenEvent | FinalEvent


class Generation:
    """One request in an engine: its id, the model version it runs on, and its events.

    Iterate it (`async for event in generation`) to receive the events, ending with one
    `FinalEvent`. Leaving the iteration early, or `async with` exiting, cancels it. Events are
    queued as the engine produces them, so a slow reader never slows the batch down.
    """

    def __init__(self, engine: Engine, request_id: str, model_version: str, prompt_tokens: int,
                 params: SamplingParams):
        self.engine = engine
        self.request_id = request_id
        self.model_version = model_version
        self.prompt_tokens = prompt_tokens
        self.params = params
        self.final: FinalEvent | None = None  # set once the FinalEvent has been produced
        self._events: asyncio.Queue[Event] = asyncio.Queue()
        self._consumed_final = False

    # Called by the engine, on the event loop.
    def _push(self, event: Event) -> None:
        if isinstance(event, FinalEvent):
            if self.final is not None:
                return
            self.final = event
        self._events.put_nowait(event)

    @property
    def done(self) -> bool:
        return self.final is not None

    def cancel(self) -> None:
        """Stop generating (idempotent); the stream ends with finish_reason "cancelled"."""
        if not self.done:
            self.engine._cancel(self)

    async def __aiter__(self) -> AsyncIterator[Event]:
        try:
            while not self._consumed_final:
                event = await self._events.get()
                if isinstance(event, FinalEvent):
                    self._consumed_final = True
                yield event
        finally:
            if not self.done:
                self.cancel()

    async def __aenter__(self) -> Generation:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        self.cancel()

    async def collect(self) -> tuple[str, FinalEvent]:
        """The whole answer text and its final event (for non-streaming callers and tests)."""
        pieces = []
        async for event in self:
            if isinstance(event, TokenEvent):
                pieces.append(event.text)
            else:
                return "".join(pieces), event
        raise EngineError("the event stream ended without a final event")  # pragma: no cover


@dataclass
class EngineStats:
    """Counters a test or /metrics can read. Histograms map a batch size to how many forward
    passes ran with that many sequences."""

    decode_batch_sizes: Counter[int] = field(default_factory=Counter)
    prefill_batch_sizes: Counter[int] = field(default_factory=Counter)
    prefill_tokens: int = 0  # prompt tokens run through the model
    reused_prompt_tokens: int = 0  # prompt tokens whose keys/values a reused row already held
    generated_tokens: int = 0
    finished: Counter[str] = field(default_factory=Counter)  # finish_reason -> requests
    active: int = 0  # sequences holding a batch slot right now
    waiting: int = 0  # submitted, not yet admitted to the batch

    def copy(self) -> EngineStats:
        return EngineStats(
            decode_batch_sizes=Counter(self.decode_batch_sizes),
            prefill_batch_sizes=Counter(self.prefill_batch_sizes),
            prefill_tokens=self.prefill_tokens,
            reused_prompt_tokens=self.reused_prompt_tokens,
            generated_tokens=self.generated_tokens,
            finished=Counter(self.finished),
            active=self.active,
            waiting=self.waiting,
        )

    @property
    def max_decode_batch(self) -> int:
        return max(self.decode_batch_sizes, default=0)


class Engine(ABC):
    """What the server uses to generate. All methods are called on the event loop."""

    # Whether load_version verifies a checkpoint's files itself (it reads them); when not, the
    # caller verifies them first (server/swap.py).
    verifies_checkpoints: bool = False

    @property
    @abstractmethod
    def ready(self) -> bool:
        """A default version is loaded and requests are accepted."""

    @property
    @abstractmethod
    def tokenizer(self) -> Any:
        """The tokenizer prompts are built with (its chat template renders conversations)."""

    @property
    @abstractmethod
    def context_length(self) -> int:
        """Most tokens (prompt plus answer) one sequence may hold."""

    @property
    @abstractmethod
    def default_version(self) -> str:
        """The version new requests get when they do not name one."""

    @abstractmethod
    def versions(self) -> list[str]:
        """The versions requests may name now (loaded and not being unloaded)."""

    @abstractmethod
    def submit(
        self,
        prompt: Prompt,
        params: SamplingParams = SamplingParams(),
        *,
        version: str | None = None,
        request_id: str | None = None,
    ) -> Generation:
        """Start generating an answer to `prompt` on `version` (default: the default version).

        Raises at once (never through the stream) for a bad request: InvalidSamplingParams,
        UnknownModelVersion, EngineOverloaded, EngineNotReady.
        """

    @abstractmethod
    async def load_version(self, version: str, path: str | Path, *, make_default: bool = False) -> None:
        """Load checkpoint `path` as `version` next to the versions already served. A failed
        load raises and changes nothing: the versions served before keep serving."""

    @abstractmethod
    def set_default_version(self, version: str) -> None:
        """New requests without a version get `version` from now on; in-flight ones are untouched."""

    @abstractmethod
    async def unload_version(self, version: str, *, timeout: float | None = None) -> None:
        """Stop accepting `version`, wait until its in-flight requests finish (cancelling those
        left after `timeout` seconds), then free it. The default version cannot be unloaded."""

    @abstractmethod
    def in_flight(self, version: str | None = None) -> int:
        """Requests submitted and not finished (on `version`, or on all versions)."""

    @abstractmethod
    def stats(self) -> EngineStats:
        """A snapshot of the engine's counters."""

    @abstractmethod
    async def start(self) -> None:
        """Start the engine's machinery (idempotent)."""

    @abstractmethod
    async def close(self) -> None:
        """Cancel everything in flight and release the models (idempotent)."""

    @abstractmethod
    def _cancel(self, generation: Generation) -> None:
        """Engine side of Generation.cancel()."""


@dataclass
class VersionRecord:
    """Loop-side record of a version an engine serves; each engine's own record adds what it
    needs to run requests on it (a tokenizer, a served name)."""

    name: str  # what requests and stored messages call it (a checkpoint id)
    accepting: bool = field(default=True, kw_only=True)  # False once it is being unloaded
    in_flight: int = field(default=0, kw_only=True)  # requests submitted on it and not finished
    drained: asyncio.Event = field(default_factory=asyncio.Event, kw_only=True)  # set at in_flight 0


class VersionedEngine(Engine):
    """The version bookkeeping both engines share: which versions are live, which one new
    requests get, what every submit checks, how many requests each version has in flight, and
    how a replaced version drains before it is freed.

    Subclasses keep `_versions` (name -> a `VersionRecord`) and `_default`, call `_submitting`
    at the start of `submit` and `_count_in` / `_count_out` as requests begin and finish, and
    say which requests are live and how many more fit.
    """

    _versions: dict[str, VersionRecord]
    _default: str | None
    config: Any  # the engine's config: its `limits` bound every request's params

    @abstractmethod
    def _live(self) -> Mapping[str, Any]:
        """The requests submitted and not yet finished, by request id."""

    @abstractmethod
    def _live_generations(self) -> Iterable[Generation]:
        """Every generation submitted and not yet finished."""

    @abstractmethod
    def _context_length_of(self, record: VersionRecord) -> int:
        """Most tokens (prompt plus answer) a request on this version may hold."""

    @abstractmethod
    def _overloaded(self) -> str | None:
        """Why one more request does not fit now (EngineOverloaded's message), or None."""

    def versions(self) -> list[str]:
        return [name for name, record in self._versions.items() if record.accepting]

    def in_flight(self, version: str | None = None) -> int:
        if version is None:
            return len(self._live())
        record = self._versions.get(version)
        return record.in_flight if record else 0

    def _submitting(
        self, prompt: Prompt, params: SamplingParams, version: str | None, request_id: str | None
    ) -> tuple[VersionRecord, SamplingParams, int, str]:
        """What every submit checks once the engine is ready, in this order: the params within
        the limits (unset ones defaulted), the version (default: the default one) accepting, a
        prompt that leaves room for an answer, room for one more request, a fresh request id.
        Returns the version's record, the checked params, its context length and the id."""
        params = params.checked(self.config.limits)
        name = version or self._default
        record = self._versions.get(name)
        if record is None or not record.accepting:
            raise UnknownModelVersion(name, self.versions())
        context_length = self._context_length_of(record)
        n_prompt = len(prompt.token_ids)
        if not n_prompt or n_prompt >= context_length:
            raise PromptTooLong(n_prompt, context_length - 1, context_length, params.max_new_tokens)
        if (problem := self._overloaded()) is not None:
            raise EngineOverloaded(problem)
        request_id = request_id or uuid.uuid4().hex
        if request_id in self._live():
            raise ValueError(f"request id {request_id!r} is already in flight")
        return record, params, context_length, request_id

    def _count_in(self, record: VersionRecord) -> None:
        """A request was submitted on this version: it is not drained until that one ends."""
        record.in_flight += 1
        record.drained.clear()

    def _count_out(self, generation: Generation) -> None:
        """A request finished (once per request): its version drains when it was the last."""
        record = self._versions.get(generation.model_version)
        if record is not None:
            record.in_flight -= 1
            if record.in_flight == 0:
                record.drained.set()

    def set_default_version(self, version: str) -> None:
        record = self._versions.get(version)
        if record is None or not record.accepting:
            raise UnknownModelVersion(version, self.versions())
        self._default = version

    async def _drain_and_forget(self, version: str, timeout: float | None) -> None:
        """Stop accepting `version`, wait for its in-flight requests (cancelling those left after
        `timeout` seconds), then drop its record; the engine frees its own resources after."""
        record = self._versions.get(version)
        if record is None:
            raise UnknownModelVersion(version, self.versions())
        if version == self._default:
            raise VersionInUse(f"{version} is the default version: set another default before unloading it")
        record.accepting = False
        if record.in_flight:
            try:
                await asyncio.wait_for(record.drained.wait(), timeout)
            except TimeoutError:
                log.warning("unloading %s: cancelling %d requests still running", version, record.in_flight)
                for generation in list(self._live_generations()):
                    if generation.model_version == version:
                        generation.cancel()
                await record.drained.wait()
        del self._versions[version]
