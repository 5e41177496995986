"""vLLM's runtime LoRA admin, for the remote engine (ENGINE_LORA_LOADING=vllm).

Before a LoRA checkpoint becomes a version, the remote is asked to load it under the checkpoint
id with `POST /v1/load_lora_adapter` {"lora_name", "lora_path"}: the checkpoint directory as
the remote sees it (`engine_path`: ENGINE_LORA_PATH_MAP rewrites the server's path prefixes).
One it already lists, or answers "has already been loaded" for (another replica was first), is
fine; any other refusal is `AdapterNotLoaded`, which refuses the version. `unload_adapter` is
best effort (ENGINE_LORA_UNLOAD). The engine decides when; this module only speaks vLLM's API.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import httpx2

from deploy.checkpoint import read_manifest
from deploy.errors import CheckpointError

from .remote_http import AdapterNotLoaded, Endpoint, describe_transport_error, error_detail

if TYPE_CHECKING:
    from .remote import RemoteEngineConfig

log = logging.getLogger("server.engine.remote")


def adapter_path(config: RemoteEngineConfig, path: str | Path) -> str | None:
    """Where the remote should load the checkpoint at `path` from, when it is a LoRA
    adapter to load at run time; None when there is nothing to load (no runtime loading,
    or a full model, which no engine loads at run time)."""
    if config.lora_loading != "vllm":
        return None
    try:
        if read_manifest(Path(path)).kind != "lora":
            return None
    except CheckpointError:
        return None  # not a checkpoint (a base model directory): the listing check decides
    return engine_path(path, config.lora_path_map)


async def load_adapter(endpoint: Endpoint, name: str, path: str) -> None:
    """Have `endpoint` serve the LoRA adapter at `path` (as it sees it) under `name`, then
    refresh its model list. Idempotent: an adapter it lists already is left as it is."""
    if endpoint.listed is not None and name in endpoint.listed:
        return
    where = f"the remote engine at {endpoint.url}"
    try:
        response = await endpoint.session.post(f"{endpoint.url}/v1/load_lora_adapter",
                                               json={"lora_name": name, "lora_path": path})
    except httpx2.HTTPError as error:
        raise AdapterNotLoaded(f"{where} could not be asked to load adapter {name!r} from {path}: "
                               f"{describe_transport_error(error)}") from error
    detail = error_detail(response) if response.status_code >= 400 else ""
    if response.status_code == 400 and "already been loaded" in detail:
        log.info("%s had adapter %r loaded already", where, name)  # another replica was first
    elif response.status_code == 404 and detail in ("Not Found", "(no body)"):
        raise AdapterNotLoaded(
            f"{where} has no POST /v1/load_lora_adapter (HTTP 404): start vLLM with "
            "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True and --enable-lora, or set "
            "ENGINE_LORA_LOADING=none and load adapters by hand"
        )
    elif response.status_code >= 400:
        raise AdapterNotLoaded(
            f"{where} refused to load adapter {name!r} from {path}: HTTP {response.status_code}: "
            f"{detail} (the path must be the checkpoint directory as the engine sees it: "
            "ENGINE_LORA_PATH_MAP; its rank must fit vLLM's --max-lora-rank)"
        )
    else:
        log.info("%s loaded adapter %r from %s", where, name, path)
    endpoint.listed = await endpoint.list_models()


async def unload_adapter(endpoint: Endpoint, name: str) -> None:
    """Best effort: an adapter left loaded costs the remote memory, never a request."""
    try:
        response = await endpoint.session.post(f"{endpoint.url}/v1/unload_lora_adapter",
                                               json={"lora_name": name})
    except httpx2.HTTPError as error:
        log.warning("could not ask %s to unload adapter %r: %s", endpoint.url, name,
                    describe_transport_error(error))
        return
    if response.status_code < 400:
        log.info("remote engine at %s unloaded adapter %r", endpoint.url, name)
    elif response.status_code == 404:
        log.info("remote engine at %s had no adapter %r to unload", endpoint.url, name)
    else:
        log.warning("remote engine at %s would not unload adapter %r: HTTP %d: %s", endpoint.url, name,
                    response.status_code, error_detail(response))


def engine_path(path: str | Path, path_map: tuple[tuple[str, str], ...]) -> str:
    """`path` (a checkpoint directory as this server sees it) as the remote engine sees it: the
    longest matching prefix of `path_map` (server prefix, remote prefix) replaced; unchanged
    when none matches (both mount the checkpoints at the same path)."""
    path = str(path).rstrip("/") or "/"
    for local, remote in sorted(path_map, key=lambda pair: len(pair[0].rstrip("/")), reverse=True):
        local = local.rstrip("/")
        if path == local or path.startswith(local + "/"):
            return remote.rstrip("/") + path[len(local):]
    return path
