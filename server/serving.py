"""How a chat turn talks to the model: the engine (server/engine/) and the prompt (server/prompt.py).

chat.py, ws.py and the HTTP routes use the Engine interface (server/engine/base.py) directly
for what it answers in one call (`default_version`, `versions()`, `close()`); this module holds
what takes more than that, so they never depend on an engine's internals: loading one from
settings, whether one is there and ready, which version a request or a conversation runs on,
building a prompt within the context budget, submitting a request, and turning the engine's
refusals into the server's wire errors. (swap.py changes which versions the engine serves,
through the Engine interface.)
"""

from __future__ import annotations

import asyncio
import importlib
import logging
from pathlib import Path
from uuid import UUID

from deploy.canary import choose_version
from deploy.state import ServingState

from .engine.base import (
    Engine,
    EngineNotReady,
    EngineOverloaded,
    InvalidSamplingParams,
    SamplingLimits,
    SamplingParams,
    UnknownModelVersion,
)
from .engine.base import Generation as EngineRequest
from .errors import (
    InvalidConversationError,
    InvalidParams,
    NotReady,
    Overloaded,
    PromptTooLongError,
    UnknownModel,
)
from .prompt import InvalidConversation, Prompt, PromptTooLong, build_prompt
from .settings import ServerSettings

log = logging.getLogger(__name__)

__all__ = ["EngineRequest", "Prompt", "load", "is_ready", "engine_urls", "base_model_dir", "pick_version",
           "conversation_version", "prompt_for", "submit"]


def sampling_limits(settings: ServerSettings) -> SamplingLimits:
    return SamplingLimits(
        max_temperature=settings.max_temperature, max_new_tokens=settings.max_new_tokens_limit
    )


def base_model_dir(settings: ServerSettings) -> Path:
    """The directory of the base model the engine serves first (the registry's base version):
    MODEL, or SmolLM2 converted under DATA_DIR (the first call converts it, tens of seconds).
    A remote engine is named after the tokenizer directory it builds prompts with."""
    from deploy.base_model import resolve_from_settings

    if settings.engine == "remote" and settings.engine_tokenizer:
        return Path(settings.engine_tokenizer).resolve()
    return resolve_from_settings(settings)


async def load(settings: ServerSettings) -> Engine:
    """The engine the settings ask for (ENGINE=local|remote), started and ready to serve."""
    if settings.engine == "remote":
        from .engine.remote import load_remote_engine

        engine = await load_remote_engine(settings)
        await engine.start()
        return engine
    from .engine.local import LocalEngineConfig, start_local_engine

    # The first run converts SmolLM2 from its GGUF (tens of seconds); later runs just find it.
    model_dir = await asyncio.to_thread(base_model_dir, settings)
    config = LocalEngineConfig(
        max_batch_size=settings.max_batch_size,
        context_length=settings.context_length,
        threads=settings.engine_threads,
        merge_adapters=settings.engine_merge_adapters,
        reuse_prefixes=settings.engine_prefix_reuse,
        kv_cache_keep_mb=settings.engine_kv_cache_keep_mb,
        dtype=settings.engine_dtype,
        limits=sampling_limits(settings),
    )
    engine = await start_local_engine(model_dir, config)
    # Importing peft takes seconds; paid now, not inside the first LoRA swap's load.
    await asyncio.to_thread(importlib.import_module, "peft")
    return engine


def is_ready(engine: Engine | None) -> bool:
    return engine is not None and bool(engine.ready)


def engine_urls(engine: Engine | None) -> tuple[str | None, list[str]]:
    """A remote engine's URL for new requests and its old ones still draining after a
    blue/green switch; (None, []) for the local engine."""
    url = getattr(engine, "url", None)
    return (url, list(engine.draining_urls())) if url is not None else (None, [])


def pick_version(engine: Engine, asked: str | None) -> str:
    """The model version a request runs on: the default one unless it names a served one."""
    if asked is None or asked == "default":
        return engine.default_version
    served = engine.versions()
    if asked not in served:
        raise UnknownModel(asked, served)
    return asked


def conversation_version(
    engine: Engine, state: ServingState | None, key: UUID | str | None, assigned: str | None
) -> str:
    """The version a conversation's next answer runs on, among those this engine serves.

    A conversation keeps the version it was given (`assigned`) while the registry still has it
    live (serving or canary) and this replica serves it; otherwise it gets the serving one. A
    conversation with none yet gets deploy.canary's choice on `key` (its id; for an API client,
    a key of the client's, so one client sees one version): the canary for its share of keys
    (the same choice on every replica), else the serving policy. Where this replica could not
    load the choice, what it serves by default answers instead.
    """
    default = engine.default_version
    served = engine.versions()
    if assigned is not None:
        live = state is None or assigned in state.live_versions
        return assigned if live and assigned in served else default
    if key is None or state is None or state.serving is None or state.canary is None:
        return default
    chosen = choose_version(key, state)
    return chosen if chosen in served else default


def prompt_for(
    engine: Engine, settings: ServerSettings, turns: list[dict[str, str]], params: SamplingParams
) -> Prompt:
    """The prompt answering the last user turn of `turns`, cut to the context budget."""
    try:
        return build_prompt(
            turns,
            engine.tokenizer,
            context_length=min(settings.context_length, engine.context_length),
            max_new_tokens=params.max_new_tokens,
            system_prompt=settings.system_prompt,
        )
    except PromptTooLong as exc:
        raise PromptTooLongError(str(exc)) from None
    except InvalidConversation as exc:
        raise InvalidConversationError(str(exc)) from None


def submit(
    engine: Engine, prompt: Prompt, params: SamplingParams, version: str | None
) -> EngineRequest:
    """Start generating; the engine's refusals come back as the server's wire errors."""
    try:
        return engine.submit(prompt, params, version=version)
    except UnknownModelVersion as exc:
        raise UnknownModel(exc.version, exc.served) from None
    except InvalidSamplingParams as exc:
        raise InvalidParams(str(exc)) from None
    except EngineOverloaded as exc:
        raise Overloaded(str(exc)) from None
    except EngineNotReady:
        raise NotReady() from None
    except PromptTooLong as exc:
        raise PromptTooLongError(str(exc)) from None
