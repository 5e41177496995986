"""Helpers for the hot-swap and canary tests: a registry database of one's own, LoRA adapters on
the tiny model, a server whose app the test can reach, and and the load of concurrent websocket
streams (tests/support/ws_load.py) that records what every request ran on.

The registry holds global facts (one serving policy, one canary), and a swap changes the
engine's versions, so each test gets its own database and its own engine.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import psycopg
from support.asgi import serve_asgi
from support.database import scratch_database
from support.ws_load import StreamLoad, assert_all_completed, wait_for  # noqa: F401 - for the tests

from deploy import registry
from server.app import create_app
from server.engine.local import LocalEngineConfig, start_local_engine
from server_testkit import make_settings

BASE_ID = "TinySmolLM2"  # the tiny model's checkpoint id: the base version
ACTOR = "tester@test"


def own_database(admin_url: str, prefix: str = "flywheel_swap"):
    """A fresh, migrated database (the registry's global state is the test's alone)."""
    return scratch_database(admin_url, prefix)


def make_adapter(base_dir: Path, root: Path, checkpoint_id: str, seed: int) -> Path:
    """A LoRA checkpoint on the tiny model with random, non-zero weights (peft initialises B
    to zero otherwise), so the adapted model visibly answers differently."""
    import torch
    from peft import LoraConfig, get_peft_model

    from deploy.policy import load_base_policy, save_checkpoint

    base = load_base_policy(base_dir)
    torch.manual_seed(seed)
    config = LoraConfig(r=8, lora_alpha=64, target_modules=["q_proj", "v_proj", "down_proj"],
                        init_lora_weights=False)
    adapter = get_peft_model(base.model, config)
    target = root / checkpoint_id
    save_checkpoint(target, adapter, checkpoint_id=checkpoint_id, parent_id=BASE_ID,
                    base_model=BASE_ID, config={"lora_rank": 8, "seed": seed})
    return target


async def register_adapter(url: str, base_dir: Path, root: Path, checkpoint_id: str, seed: int) -> Path:
    """Write an adapter and register it as a candidate (off the event loop: the server shares it)."""

    def work() -> Path:
        path = make_adapter(base_dir, root, checkpoint_id, seed)
        with registry.connect(url) as conn:
            registry.register(conn, path, actor=ACTOR)
        return path

    return await asyncio.to_thread(work)


async def in_registry(url: str, change: Callable[[psycopg.Connection], Any]) -> Any:
    """Run a registry change (promote, rollback, canary) on a connection of its own, in a thread:
    the server under test runs on this event loop and must keep serving meanwhile."""

    def work():
        with registry.connect(url) as conn:
            return change(conn)

    return await asyncio.to_thread(work)


async def new_engine(tiny_model_dir: Path):
    # One torch thread: the machine is shared, and torch's default spins on every core.
    config = LocalEngineConfig(max_batch_size=32, context_length=1024, seed=0, threads=1)
    return await start_local_engine(tiny_model_dir, config)


@asynccontextmanager
async def swap_server(db_url: str, tmp_path: Path, engine_object, model_dir: Path, **overrides) -> AsyncIterator[tuple[str, Any]]:
    """The app (MODEL = the tiny model, so it registers the base) on a real uvicorn server on a
    free port; yields its base URL and the app (for its swap controller). `engine_object`:
    an engine the app uses as is; None: the app loads the one its settings (`overrides`) ask
    for, e.g. engine="remote", engine_url=..."""
    settings = make_settings(db_url, tmp_path, model=str(model_dir), **overrides)
    app = create_app(settings, engine=engine_object)
    async with serve_asgi(app) as url:
        yield url, app


async def version_info(base_url: str) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.get("/api/version")
        response.raise_for_status()
        return response.json()


async def wait_serving(base_url: str, version: str, *, in_sync: bool = True) -> dict:
    """Until this replica's default version is `version` (and it matches the registry)."""

    async def check():
        info = await version_info(base_url)
        ok = info["model_version"] == version and (info["in_sync"] or not in_sync)
        return info if ok else None

    return await wait_for(check, f"{base_url} to serve {version}")


async def load_events(url: str, checkpoint_id: str) -> list[registry.CheckpointEvent]:
    """The load results replicas recorded for `checkpoint_id`, oldest first."""

    def read(conn):
        found = registry.events(conn, checkpoint_id, limit=100)
        return [e for e in reversed(found) if e.action in registry.LOAD_ACTIONS]

    return await in_registry(url, read)
