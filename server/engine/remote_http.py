"""How the remote engine reaches a remote server: one `Endpoint` per server (its connection
pool, its health, the models it lists) and one `RequestClient` per request over that pool, plus
what the engine says when one fails. No generation logic: that is server/engine/remote.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any

import httpx2
from huggingface_hub import AsyncInferenceClient
from huggingface_hub.errors import HfHubHTTPError, InferenceTimeoutError, TextGenerationError

from .base import EngineError

if TYPE_CHECKING:
    from .remote import RemoteEngineConfig

log = logging.getLogger("server.engine.remote")  # one logger for the remote engine's modules


class RemoteEngineError(EngineError):
    """The remote engine cannot be used as configured; the message names the URL and the fix."""


class ModelNotServed(RemoteEngineError, LookupError):
    """The remote does not serve a model name a version needs."""


class AdapterNotLoaded(RemoteEngineError):
    """The remote would not load a LoRA checkpoint at run time (ENGINE_LORA_LOADING=vllm)."""


class RequestClient(AsyncInferenceClient):
    """An AsyncInferenceClient for ONE request, over its endpoint's shared connection pool.

    One per request because the client keeps every streamed response open until the client
    itself is closed: closing this one closes exactly that request's response (how a cancel
    reaches the remote), never the pool. The pool is ours, not the hub's default session,
    because that one refuses every request under HF_HUB_OFFLINE and sends the local Hugging
    Face token to whatever URL it is given.
    """

    def __init__(self, session: httpx2.AsyncClient, **kwargs: Any):
        super().__init__(**kwargs)
        self._session = session

    async def _get_async_client(self) -> httpx2.AsyncClient:
        return self._session


class Endpoint:
    """One remote server: its connection pool, its health, the models it lists, its requests."""

    def __init__(self, url: str, config: RemoteEngineConfig):
        self.url = root_url(url)
        self.timeout = httpx2.Timeout(config.read_timeout_s, connect=config.connect_timeout_s)
        self.session = _session(config, self.timeout)
        self.healthy: bool | None = None  # None: not probed yet
        self.problem: str | None = None  # why it is not healthy, for EngineNotReady and logs
        self.listed: dict[str, dict[str, Any]] | None = None  # /v1/models entries by id; None: no listing
        self.tasks: set[asyncio.Task] = set()

    async def probe(self) -> bool:
        """GET /health, then /v1/models where offered; records and returns the answer."""
        try:
            response = await self.session.get(f"{self.url}/health", timeout=self.timeout.connect)
            if response.status_code == 404:  # a gateway without /health: the listing answers for it
                response = await self.session.get(f"{self.url}/v1/models", timeout=self.timeout.connect)
            if response.status_code >= 400:
                return self._record(False, f"GET {response.url.path} answered HTTP {response.status_code}")
            self.listed = await self.list_models()
            return self._record(True, None)
        except httpx2.HTTPError as error:
            return self._record(False, describe_transport_error(error))

    async def list_models(self) -> dict[str, dict[str, Any]] | None:
        """GET /v1/models as entries by id; None where the server offers no listing."""
        try:
            response = await self.session.get(f"{self.url}/v1/models", timeout=self.timeout.connect)
            if response.status_code >= 400:
                return None  # TGI before 2.x, or a listing the server cannot build: not a failure
            entries = response.json().get("data") or []
            return {entry["id"]: entry for entry in entries if isinstance(entry, dict) and "id" in entry}
        except (httpx2.HTTPError, ValueError, AttributeError):
            return None

    def _record(self, healthy: bool, problem: str | None) -> bool:
        if healthy != self.healthy:
            if healthy:
                log.info("remote engine at %s is answering", self.url)
            else:
                log.warning("remote engine at %s is not usable: %s", self.url, problem)
        self.healthy, self.problem = healthy, problem
        return healthy

    def mark_down(self, problem: str) -> None:
        self._record(False, problem)

    def client(self, request_id: str) -> RequestClient:
        return RequestClient(self.session, base_url=self.url, timeout=self.timeout,
                              headers={"X-Request-ID": request_id})

    async def close(self) -> None:
        await self.session.aclose()


def root_url(url: str) -> str:
    """The server's root: TGI's generate route is `/`, health is `/health`, and the chat client
    appends `/v1/chat/completions` itself, so a configured trailing `/v1` is dropped."""
    url = url.strip().rstrip("/")
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    if not url.startswith(("http://", "https://")):
        raise RemoteEngineError(f"ENGINE_URL must be an http(s) URL such as http://127.0.0.1:8080, not {url!r}")
    return url


def _session(config: RemoteEngineConfig, timeout: httpx2.Timeout) -> httpx2.AsyncClient:
    async def authorize(request: httpx2.Request) -> None:
        # The hub's client attaches the local Hugging Face token (if any) to every request; a
        # self-hosted engine gets ENGINE_API_KEY or no credentials at all.
        request.headers.pop("authorization", None)
        if config.api_key:
            request.headers["authorization"] = f"Bearer {config.api_key}"

    async def read_error_body(response: httpx2.Response) -> None:
        # So an HTTP error can quote what the server said (a streamed body is unread otherwise).
        if response.status_code >= 400:
            await response.aread()

    return httpx2.AsyncClient(
        timeout=timeout,
        limits=httpx2.Limits(max_connections=config.max_in_flight + 4, max_keepalive_connections=32),
        event_hooks={"request": [authorize], "response": [read_error_body]},
    )


def describe_transport_error(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def error_detail(response: httpx2.Response) -> str:
    try:
        body = response.json()
    except (ValueError, httpx2.ResponseNotRead):
        try:
            return response.text[:500] or "(no body)"
        except httpx2.ResponseNotRead:
            return "(no body)"
    if isinstance(body, dict):
        detail = body.get("error") or body.get("detail") or body.get("message") or body
        if isinstance(detail, dict):
            detail = detail.get("message") or detail
        return detail if isinstance(detail, str) else json.dumps(detail)[:500]
    return json.dumps(body)[:500]


def describe_failure(endpoint: Endpoint, error: BaseException, config: RemoteEngineConfig) -> tuple[str, bool]:
    """What a request that failed with `error` on `endpoint` tells its client, and whether the
    engine should probe the endpoint again now (a failure to connect also marks it down)."""
    where = f"the remote engine at {endpoint.url}"
    if isinstance(error, InferenceTimeoutError) or isinstance(error, httpx2.TimeoutException):
        if isinstance(error, httpx2.ConnectTimeout) or isinstance(error.__cause__, httpx2.ConnectTimeout):
            endpoint.mark_down(f"connecting timed out after {config.connect_timeout_s} s")
            return f"{where} could not be reached within {config.connect_timeout_s} s (ENGINE_CONNECT_TIMEOUT)", True
        return (f"{where} sent nothing for {config.read_timeout_s} s (ENGINE_READ_TIMEOUT): "
                "it is overloaded or stuck"), False
    if isinstance(error, httpx2.ConnectError):
        endpoint.mark_down(describe_transport_error(error))
        return f"{where} refused the connection ({error}): is it running? check ENGINE_URL", True
    if isinstance(error, httpx2.TransportError):
        return f"{where} dropped the stream ({describe_transport_error(error)})", True
    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return f"{where} refused the request: HTTP {error.response.status_code}: {error_detail(error.response)}", False
    if isinstance(error, TextGenerationError):
        return f"{where} failed while generating: {error}", False
    if isinstance(error, RemoteEngineError):
        return f"{where}: {error}", False
    log.exception("unexpected failure streaming from %s", endpoint.url, exc_info=error)
    return f"{where} failed: {type(error).__name__}: {error}", False
