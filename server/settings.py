"""The server's settings: the store's and the model's (DATA_DIR, DATABASE_URL, MODEL), plus where to listen, which model, and the limits.

Every field is an environment variable of the same name in upper case (`PORT`, `ENGINE_URL`,
`MAX_FRAME_BYTES`, ...), read the same way by every `python -m ...` command.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, SecretStr, model_validator

from deploy.base_model import ModelSettings
from deploy.settings import DeploySettings


class ServerSettings(ModelSettings, DeploySettings):
    # Where to listen.
    host: str = Field("127.0.0.1", description="Interface to bind; 0.0.0.0 to serve a network.")
    port: int = Field(8000, ge=0, le=65535, description="TCP port of the web page, /ws and the API.")
    replica_name: str | None = Field(
        None,
        description="How this replica is named in the registry (load records, `deploy engine-url "
        "--replica`). Unset: hostname:port.",
    )

    # Which model (MODEL, from ModelSettings), served by what.
    engine: Literal["local", "remote"] = Field(
        "local", description="local: in-process transformers; remote: ENGINE_URL (TGI/OpenAI API)."
    )
    engine_url: str | None = Field(
        None, description="Base URL of the remote engine (TGI, vLLM, SGLang, transformers serve)."
    )
    # The remote engine (ENGINE=remote); see server/engine/remote.py.
    engine_api: Literal["openai", "tgi"] = Field(
        "openai",
        description="openai: POST /v1/chat/completions (vLLM, SGLang, transformers serve, TGI); "
        "tgi: TGI's own generate_stream with the prompt rendered here.",
    )
    engine_model: str | None = Field(
        None, description="The name the remote serves the model under. Unset: the only one listed."
    )
    engine_tokenizer: str | None = Field(
        None,
        description="Local directory of the remote model's tokenizer (prompts are cut to budget "
        "here). Unset: the MODEL directory (or the converted default).",
    )
    engine_api_key: SecretStr | None = Field(
        None, description="Bearer token for the remote engine (vLLM --api-key, a gateway's key)."
    )
    engine_connect_timeout: float = Field(5.0, gt=0, description="Seconds to open a connection.")
    engine_read_timeout: float = Field(
        120.0, gt=0, description="Longest silence mid-request, in seconds (time to first token included)."
    )
    engine_health_interval: float = Field(5.0, gt=0, description="Seconds between health probes.")
    engine_drain_timeout: float | None = Field(
        600.0,
        description="After a blue/green switch or a promotion, seconds streams may finish on the "
        "version they started on before they are cancelled.",
    )
    engine_lora_loading: Literal["none", "vllm"] = Field(
        "none",
        description="none: the remote engine must already serve a checkpoint before it is "
        "promoted; vllm: the server loads a LoRA checkpoint into vLLM first (POST "
        "/v1/load_lora_adapter; vLLM needs VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, --enable-lora).",
    )
    engine_lora_path_map: str | None = Field(
        None,
        description="Where the engine sees checkpoint directories, when it mounts them elsewhere: "
        "SERVER_PREFIX=ENGINE_PREFIX[,...], e.g. /data=/flywheel. Unset: the same paths.",
    )
    engine_lora_unload: bool = Field(
        False,
        description="With ENGINE_LORA_LOADING=vllm, unload an adapter from vLLM once its version "
        "has drained here (POST /v1/unload_lora_adapter). Only with one replica per engine: "
        "another replica may still stream from it.",
    )
    max_batch_size: int = Field(
        32, gt=0, description="Most requests the local engine decodes in one batched step."
    )
    engine_threads: int | None = Field(
        None, gt=0, description="torch threads of the local engine. Unset: torch's default."
    )
    engine_dtype: Literal["auto", "float32", "bfloat16", "int8", "int4"] = Field(
        "auto",
        description="Local engine: how the decode path stores the weights. auto: int4 for a Llama-"
        "architecture model (the fast path), float32 for any other; float32; bfloat16; int8 or "
        "int4: weight-only quantized (int8 per output channel, int4 in groups of 32 with a zero point: "
        "the grid of the Q4_1 GGUF the default is converted from, kept exactly, with the output "
        "projection in int8), computed in bfloat16. Fewer bytes "
        "read per decode step; a Llama-architecture model is needed for anything but float32.",
    )
    engine_prefix_reuse: bool = Field(
        True,
        description="Local engine: admit a request into the KV cache row that already holds the longest "
        "prefix of its prompt (a conversation's next turn, the same prompt again), so only the rest is "
        "prefilled. false: prefill every prompt from its first token.",
    )
    engine_kv_cache_keep_mb: float = Field(
        512, ge=0,
        description="Local engine: a version's KV cache is given back when it goes idle only when it is "
        "larger than this (MiB). Below it the rows keep their conversations' prefixes for the next "
        "turn (ENGINE_PREFIX_REUSE); 0 gives it back after every burst.",
    )
    engine_merge_adapters: bool = Field(
        True,
        description="Local engine: once a LoRA version serves (its adapter applied on the fly), fold "
        "the adapter into private copies of the weights it touches, in the background: base decode "
        "speed for that memory. false: keep applying it on the fly (~12% slower decode with an adapter "
        "on every projection, no extra memory).",
    )

    # Who may chat.
    allow_anonymous: bool | None = Field(
        None,
        description="Admit users by any token they bring (first use registers it) and by no "
        "token at all. Unset: true for the embedded database, false with DATABASE_URL.",
    )
    min_token_chars: int = Field(
        16,
        gt=0,
        description="Shortest self-chosen token admitted for anonymous users, so tokens are not "
        "guessable (the web page uses 43 random characters).",
    )

    # Limits. A request over a limit is refused with an error that names the setting.
    max_frame_bytes: int = Field(
        256 * 1024, gt=0, description="Largest websocket text frame (or HTTP body) accepted, in bytes."
    )
    max_json_depth: int = Field(
        32,
        gt=0,
        description="Deepest nesting of arrays and objects in a frame or JSON body; deeper is "
        "refused as bad_json before parsing (the contract's frames nest 4 levels at most).",
    )
    max_connections_per_user: int = Field(
        16,
        gt=0,
        description="Websocket connections one user may hold open at once (per process); one more "
        "is accepted, sent a too_many_connections error frame and closed (1008).",
    )
    max_concurrent_generations: int = Field(
        4, gt=0, description="Generations one user may have running at once (all connections)."
    )
    rate_limit_per_minute: int = Field(
        60, gt=0, description="Requests one user may make per minute (generations and feedback)."
    )
    rate_limit_storage: str = Field(
        "async+memory://",
        description="Where rate-limit counters live (a `limits` storage URI): per process by "
        "default; async+redis://HOST shares them between replicas.",
    )

    # Faults: the database going away, and shutting down.
    db_wait_timeout: float = Field(
        3.0,
        gt=0,
        description="Seconds a request waits for a pooled database connection; past it (the "
        "database is down, or every connection is busy) it is answered 503 database_unavailable "
        "with Retry-After.",
    )
    db_reconnect_timeout: float = Field(
        2.0,
        gt=0,
        description="Seconds the pool keeps retrying (with backoff) to replace a lost connection "
        "before it gives that attempt up; the next request starts a fresh one, so service is "
        "back within about this long once the database returns.",
    )
    answer_store_retry_s: float = Field(
        15.0,
        ge=0,
        description="How long an answer finished while the database is unavailable keeps trying "
        "to be stored before the client is told `answer_not_stored` (its message stays stored, "
        "with no answer).",
    )
    shutdown_timeout: float = Field(
        30.0,
        ge=0,
        description="On SIGTERM, seconds in-flight answers may run to their end before they are "
        "cancelled (stored as far as they were delivered, finish_reason cancelled).",
    )

    # Sampling. Defaults are SmolLM2's recommended ones; requests may ask for others within bounds.
    default_temperature: float = Field(0.2, ge=0, description="0 is greedy decoding.")
    default_top_p: float = Field(
        0.9, gt=0, le=1, description="Nucleus sampling: sample among the likeliest tokens holding this probability mass."
    )
    default_max_new_tokens: int = Field(256, gt=0, description="Answer length when not asked, in tokens.")
    max_temperature: float = Field(2.0, ge=0, description="Highest temperature a request may ask for.")
    max_new_tokens_limit: int = Field(
        1024, gt=0, description="Highest max_new_tokens a request may ask for."
    )

    # Prompt.
    context_length: int = Field(
        2048, gt=0, description="Prompt plus answer budget, in tokens; oldest turns are dropped to fit."
    )
    system_prompt: str | None = Field(
        None, description="Prepended to every conversation and never truncated. Unset: none."
    )

    @model_validator(mode="after")
    def _check(self) -> ServerSettings:
        if self.default_max_new_tokens > self.max_new_tokens_limit:
            raise ValueError("DEFAULT_MAX_NEW_TOKENS must not exceed MAX_NEW_TOKENS_LIMIT")
        if self.default_temperature > self.max_temperature:
            raise ValueError("DEFAULT_TEMPERATURE must not exceed MAX_TEMPERATURE")
        if self.max_new_tokens_limit >= self.context_length:
            raise ValueError("MAX_NEW_TOKENS_LIMIT must leave room for a prompt in CONTEXT_LENGTH")
        if self.engine == "remote" and not self.engine_url:
            raise ValueError("ENGINE=remote needs ENGINE_URL (e.g. http://127.0.0.1:8080)")
        if self.engine_lora_loading == "vllm" and self.engine_api != "openai":
            raise ValueError("ENGINE_LORA_LOADING=vllm needs ENGINE_API=openai (vLLM's API)")
        self.engine_lora_path_pairs  # noqa: B018 - refuses a malformed ENGINE_LORA_PATH_MAP now
        return self

    @property
    def engine_lora_path_pairs(self) -> tuple[tuple[str, str], ...]:
        """ENGINE_LORA_PATH_MAP as (server prefix, engine prefix) pairs."""
        pairs = []
        for item in (self.engine_lora_path_map or "").split(","):
            if not item.strip():
                continue
            local, sep, remote = (part.strip() for part in item.partition("="))
            if not sep or not local.startswith("/") or not remote.startswith("/"):
                raise ValueError(
                    f"ENGINE_LORA_PATH_MAP item {item.strip()!r} must be SERVER_PREFIX=ENGINE_PREFIX "
                    "with absolute paths, e.g. /data=/flywheel"
                )
            pairs.append((local, remote))
        return tuple(pairs)

    @property
    def anonymous_allowed(self) -> bool:
        if self.allow_anonymous is not None:
            return self.allow_anonymous
        return self.database_url is None
