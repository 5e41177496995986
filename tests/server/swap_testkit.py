"""Helpers for the hot-swap and canary tests: a registry database of one's own, LoRA adapters on
the tiny model, a server whose app the test can reach, and a load of concurrent websocket streams
that records what every request ran on.

The registry holds global facts (one serving policy, one canary), and a swap changes the
engine's versions, so each test gets its own database and its own engine.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psycopg
import uvicorn
from support.database import scratch_database

from deploy import registry
from server.app import create_app
from server.engine.local import LocalEngineConfig, start_local_engine
from server_testkit import connect, make_settings, new_token

BASE_ID = "TinySmolLM2"  # the tiny model's checkpoint id: the base version
ACTOR = "tester@test"
WAIT_S = 60  # a loaded machine can be slow; a healthy swap takes well under a second here


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
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{port}", app
    finally:
        server.should_exit = True
        await task


async def version_info(base_url: str) -> dict:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        response = await client.get("/api/version")
        response.raise_for_status()
        return response.json()


async def wait_for(check: Callable[[], Awaitable[Any]], what: str, timeout: float = WAIT_S) -> Any:
    """Poll `check` until it returns something truthy; fail saying `what` never happened."""
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = await check()
        if last:
            return last
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last})")


async def wait_serving(base_url: str, version: str, *, in_sync: bool = True) -> dict:
    """Until this replica's default version is `version` (and it matches the registry)."""

    async def check():
        info = await version_info(base_url)
        ok = info["model_version"] == version and (info["in_sync"] or not in_sync)
        return info if ok else None

    return await wait_for(check, f"{base_url} to serve {version}")


@dataclass
class StreamRecord:
    """One request of the load: when it was sent, what ran it, how it ended."""

    stream: int
    sent_at: float  # time.monotonic()
    started_at: float | None = None
    done_at: float | None = None
    model_version: str | None = None
    message_id: str | None = None
    conversation_id: str | None = None
    text: str = ""
    finish_reason: str | None = None
    errors: list[dict] = field(default_factory=list)


class StreamLoad:
    """`streams` websocket clients, each sending a new conversation's message as soon as its
    previous answer is done, until `stop()`; every request ends up in `records`."""

    def __init__(self, base_url: str, streams: int = 16, *, max_new_tokens: int = 48,
                 temperature: float = 0.0, content: str = "Tell me about the sea."):
        self.base_url = base_url
        self.streams = streams
        self.params = {"max_new_tokens": max_new_tokens, "temperature": temperature}
        self.content = content
        self.records: list[StreamRecord] = []
        self._stop = asyncio.Event()
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        self._tasks = [asyncio.create_task(self._stream(i)) for i in range(self.streams)]

    async def stop(self) -> None:
        """Let every stream finish the request it is on, then close."""
        self._stop.set()
        await asyncio.gather(*self._tasks)

    def started_since(self, moment: float) -> list[StreamRecord]:
        return [r for r in self.records if r.sent_at > moment and r.started_at is not None]

    async def wait_started(self, count: int, since: float = 0.0) -> None:
        async def check():
            return len(self.started_since(since)) >= count

        await wait_for(check, f"{count} requests sent after t={since:.2f} to start")

    async def _stream(self, index: int) -> None:
        async with connect(self.base_url, new_token()) as ws:
            while not self._stop.is_set():
                record = StreamRecord(stream=index, sent_at=time.monotonic())
                self.records.append(record)
                await ws.send({"type": "message", "content": self.content, "params": self.params})
                await self._read_answer(ws, record)

    @staticmethod
    async def _read_answer(ws, record: StreamRecord) -> None:
        pieces = []
        while True:
            frame = await ws.recv()
            kind = frame["type"]
            if kind == "started":
                record.started_at = time.monotonic()
                record.model_version = frame["model_version"]
                record.message_id = frame["message_id"]
                record.conversation_id = frame["conversation_id"]
            elif kind == "token":
                pieces.append(frame["text"])
            elif kind == "error":
                record.errors.append(frame)
                if record.started_at is None:  # refused before starting: nothing else comes
                    return
            elif kind == "done":
                record.done_at = time.monotonic()
                record.finish_reason = frame["finish_reason"]
                record.text = "".join(pieces)
                return


def assert_all_completed(records: list[StreamRecord]) -> None:
    """No request was refused or failed, and every one ran to its end."""
    failed = [r for r in records if r.errors or r.finish_reason not in ("length", "stop")]
    assert not failed, f"{len(failed)} of {len(records)} requests failed, e.g. {failed[:3]}"


async def load_events(url: str, checkpoint_id: str) -> list[registry.CheckpointEvent]:
    """The load results replicas recorded for `checkpoint_id`, oldest first."""

    def read(conn):
        found = registry.events(conn, checkpoint_id, limit=100)
        return [e for e in reversed(found) if e.action in registry.LOAD_ACTIONS]

    return await in_registry(url, read)
