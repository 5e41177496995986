"""Hot swap, end to end on the tiny model, a real PostgreSQL and real NOTIFYs: promotions,
a corrupt checkpoint, rollback, two server processes, and a listener whose connection dies.

Each test has its own registry database and its own engine (a swap changes the engine's
versions). Registry changes run in a thread: the server under test shares the event loop.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import psycopg
import pytest

from deploy import registry
from swap_testkit import (
    ACTOR,
    BASE_ID,
    StreamLoad,
    assert_all_completed,
    in_registry,
    load_events,
    own_database,
    register_adapter,
    swap_server,
    version_info,
    wait_for,
    wait_serving,
)

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def swap_db(admin_url):
    with own_database(admin_url) as url:
        yield url


async def _swap_under_load(base_url: str, change, new_version: str, streams: int = 16):
    """Run `streams` concurrent streams, make the registry change once each has a request in
    flight, and keep the load going until 16 requests started after the replica swapped.
    Returns (load, before, changed_at, swapped_at, swap): monotonic times just before the change,
    once it committed, and when the replica first reported the new version; and the replica's
    own account of the swap (GET /api/version's last_swap)."""
    load = StreamLoad(base_url, streams)
    load.start()
    try:
        await load.wait_started(streams)
        before = time.monotonic()
        await change()
        changed_at = time.monotonic()
        info = await wait_serving(base_url, new_version)
        swapped_at = time.monotonic()
        await load.wait_started(streams, since=swapped_at)
    finally:
        await load.stop()
    return load, before, changed_at, swapped_at, info["last_swap"]


def _check_split(load: StreamLoad, before: float, swapped_at: float, swap: dict, old: str, new: str) -> None:
    """Requests sent before the change ran on `old`, those sent after the replica swapped on
    `new`; at least one old stream was still running when the swap happened (it drained)."""
    assert_all_completed(load.records)
    early = [r for r in load.records if r.sent_at < before]
    late = [r for r in load.records if r.sent_at > swapped_at]
    assert len(early) >= 16 and len(late) >= 16
    assert {r.model_version for r in early} == {old}
    assert {r.model_version for r in late} == {new}
    assert {r.model_version for r in load.records} == {old, new}
    # The replica's own count, not this test's clock: on a busy machine every old stream may end
    # between the swap and the moment the test's next poll sees it.
    assert swap["draining"] >= 1, "no old stream overlapped the swap"
    # Greedy answers to one prompt: the adapter's weights really answer, not just its label.
    assert not {r.text for r in early} & {r.text for r in late}


async def _stored_versions(url: str, message_ids: list[str]) -> dict[str, str]:
    async with await psycopg.AsyncConnection.connect(url) as conn:
        cur = await conn.execute(
            "SELECT id::text, model_version FROM messages WHERE id = ANY(%s::uuid[])", (message_ids,)
        )
        return dict(await cur.fetchall())


async def test_promotion_under_load_swaps_without_dropping_a_stream(swap_db, swap_engine, tiny_model_dir, tmp_path):
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, app):
        await wait_serving(url, BASE_ID)
        await register_adapter(swap_db, tiny_model_dir, tmp_path, "lora-a", seed=1)

        async def promote():
            await in_registry(swap_db, lambda c: registry.promote(c, "lora-a", actor=ACTOR))

        load, before, _, swapped_at, swap = await _swap_under_load(url, promote, "lora-a")

        _check_split(load, before, swapped_at, swap, BASE_ID, "lora-a")
        stored = await _stored_versions(swap_db, [r.message_id for r in load.records])
        assert stored == {r.message_id: r.model_version for r in load.records}
        info = await version_info(url)
        assert info["last_swap"]["previous"] == BASE_ID and info["last_swap"]["version"] == "lora-a"
        assert info["last_swap"]["draining"] > 0 and info["last_swap"]["load_s"] is not None
        assert info["last_failure"] is None and info["registry_serving"] == "lora-a"
        # The base drains, then is unloaded (its weights stay: the adapter shares them).
        await wait_for(lambda: _served(swap_engine, ["lora-a"]), "the base version to be unloaded")
        loaded = await load_events(swap_db, "lora-a")
        assert [(e.action, e.actor) for e in loaded] == [("loaded", app.state.swaps.replica)]
        metrics = await _metrics(url)
        assert "flywheel_swaps_total 1.0" in metrics
        assert 'flywheel_serving_version{role="default",version="lora-a"} 1.0' in metrics


async def test_a_corrupt_checkpoint_leaves_the_old_policy_serving(swap_db, swap_engine, tiny_model_dir, tmp_path):
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, app):
        await wait_serving(url, BASE_ID)
        path = await register_adapter(swap_db, tiny_model_dir, tmp_path, "lora-bad", seed=2)

        def promote_then_corrupt(conn):
            # The registry verified the files; they change before the NOTIFY goes out on commit
            # (a replica's copy going bad, a half-finished rsync).
            with conn.transaction():
                registry.promote(conn, "lora-bad", actor=ACTOR)
                weights = path / "adapter_model.safetensors"
                data = bytearray(weights.read_bytes())
                data[-1] ^= 0xFF
                weights.write_bytes(bytes(data))

        load = StreamLoad(url, 16)
        load.start()
        try:
            await load.wait_started(16)
            await in_registry(swap_db, promote_then_corrupt)
            info = await wait_for(lambda: _failed(url, "lora-bad"), "the failed load to show")
            await load.wait_started(16, since=time.monotonic())
        finally:
            await load.stop()

        assert_all_completed(load.records)
        assert {r.model_version for r in load.records} == {BASE_ID}
        assert info["model_version"] == BASE_ID and info["registry_serving"] == "lora-bad"
        assert not info["in_sync"] and "sha256" in info["last_failure"]["error"]
        assert swap_engine.versions() == [BASE_ID]
        with registry.connect(swap_db) as conn:
            failures = registry.status(conn).load_failures
        assert [(f.checkpoint_id, f.actor) for f in failures] == [("lora-bad", app.state.swaps.replica)]
        assert "sha256" in failures[0].reason
        assert "flywheel_swap_failures_total 1.0" in await _metrics(url)

        # Rolling back from the failed promotion: the registry agrees with the replica again,
        # which has nothing to load and records nothing more.
        await in_registry(swap_db, lambda c: registry.rollback(c, actor=ACTOR, reason="corrupt"))
        info = await wait_serving(url, BASE_ID)
        assert info["registry_serving"] == BASE_ID and info["last_swap"] is None
        assert len(await load_events(swap_db, "lora-bad")) == 1


async def test_rollback_under_load(swap_db, swap_engine, tiny_model_dir, tmp_path):
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, _):
        await wait_serving(url, BASE_ID)
        await register_adapter(swap_db, tiny_model_dir, tmp_path, "lora-r", seed=3)
        await in_registry(swap_db, lambda c: registry.promote(c, "lora-r", actor=ACTOR))
        await wait_serving(url, "lora-r")
        await wait_for(lambda: _served(swap_engine, ["lora-r"]), "the base version to be unloaded")

        async def rollback():
            await in_registry(swap_db, lambda c: registry.rollback(c, actor=ACTOR, reason="test"))

        load, before, _, swapped_at, swap = await _swap_under_load(url, rollback, BASE_ID)

        _check_split(load, before, swapped_at, swap, "lora-r", BASE_ID)
        await wait_for(lambda: _served(swap_engine, [BASE_ID]), "the adapter to be unloaded")
        info = await version_info(url)
        assert info["last_swap"]["previous"] == "lora-r" and info["last_swap"]["version"] == BASE_ID


async def test_a_rollback_while_the_old_version_drains_loads_nothing(swap_db, swap_engine, tiny_model_dir, tmp_path):
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, _):
        await wait_serving(url, BASE_ID)
        await register_adapter(swap_db, tiny_model_dir, tmp_path, "lora-d", seed=8)
        long = StreamLoad(url, 4, max_new_tokens=256)  # keeps the base busy through both changes
        long.start()
        try:
            await long.wait_started(4)
            await in_registry(swap_db, lambda c: registry.promote(c, "lora-d", actor=ACTOR))
            info = await wait_serving(url, "lora-d")
            assert info["draining"] == [BASE_ID] and info["versions"] == ["lora-d", BASE_ID]
            await in_registry(swap_db, lambda c: registry.rollback(c, actor=ACTOR, reason="test"))
            info = await wait_serving(url, BASE_ID)
        finally:
            await long.stop()
        assert info["last_swap"]["previous"] == "lora-d" and info["last_swap"]["load_s"] is None
        assert_all_completed(long.records)
        assert {r.model_version for r in long.records[:4]} == {BASE_ID}  # the ones that drained
        assert await load_events(swap_db, BASE_ID) == []  # never unloaded, so never reloaded
        await wait_for(lambda: _served(swap_engine, [BASE_ID]), "the adapter to be unloaded")


async def test_a_lost_listener_connection_reconnects_and_catches_up(swap_db, swap_engine, tiny_model_dir, tmp_path):
    async with swap_server(swap_db, tmp_path, swap_engine, tiny_model_dir) as (url, app):
        await wait_serving(url, BASE_ID)
        watcher = app.state.swaps.watcher
        for checkpoint_id, seed in (("lora-1", 4), ("lora-2", 5)):
            await register_adapter(swap_db, tiny_model_dir, tmp_path, checkpoint_id, seed)

        # The database drops the listener (as in a restart); it reconnects and then hears NOTIFY.
        await _terminate(swap_db, watcher.backend_pid)
        await wait_for(lambda: _listening_again(url, watcher, 2), "the listener to reconnect")
        await in_registry(swap_db, lambda c: registry.promote(c, "lora-1", actor=ACTOR))
        await wait_serving(url, "lora-1")

        # Dropped again, and the promotion commits while it is away: its NOTIFY is lost, and the
        # state read on reconnecting catches up.
        await _terminate(swap_db, watcher.backend_pid)
        await in_registry(swap_db, lambda c: registry.promote(c, "lora-2", actor=ACTOR))
        await wait_serving(url, "lora-2")
        assert watcher.connects >= 3

        # A reconnect delivers the same state again: nothing is loaded or recorded twice.
        await _terminate(swap_db, watcher.backend_pid)
        await wait_for(lambda: _listening_again(url, watcher, 4), "the listener to reconnect")
        assert [e.action for e in await load_events(swap_db, "lora-2")] == ["loaded"]
        assert (await version_info(url))["last_swap"]["version"] == "lora-2"
        answer = await _one_answer(url)
        assert answer["model_version"] == "lora-2"


async def test_two_server_processes_both_swap_on_one_notify(swap_db, tiny_model_dir, tmp_path):
    ports = [_free_port(), _free_port()]
    servers = [_start_server(swap_db, tiny_model_dir, tmp_path / f"server-{port}", port) for port in ports]
    try:
        urls = [f"http://127.0.0.1:{port}" for port in ports]
        for url, process in zip(urls, servers):
            await wait_for(lambda: _healthy(url, process), f"the server at {url} to start", timeout=180)
        for url in urls:
            await wait_serving(url, BASE_ID)
        await register_adapter(swap_db, tiny_model_dir, tmp_path, "lora-x", seed=6)
        await in_registry(swap_db, lambda c: registry.promote(c, "lora-x", actor=ACTOR))
        infos = [await wait_serving(url, "lora-x") for url in urls]
        replicas = {info["replica"] for info in infos}
        assert replicas == {f"{socket.gethostname()}:{port}" for port in ports}
        recorded = await load_events(swap_db, "lora-x")
        assert sorted((e.action, e.actor) for e in recorded) == sorted(("loaded", r) for r in replicas)
    finally:
        for process in servers:
            process.send_signal(signal.SIGTERM)
        for process in servers:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


# -- helpers -------------------------------------------------------------------------------------


async def _served(engine, versions: list[str]) -> bool:
    return engine.versions() == versions


async def _failed(url: str, version: str) -> dict | None:
    info = await version_info(url)
    failure = info["last_failure"]
    return info if failure and failure["version"] == version else None


async def _metrics(url: str) -> str:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return (await client.get("/metrics/")).text


async def _terminate(url: str, backend_pid: int | None) -> None:
    assert backend_pid is not None, "the listener is not connected"
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        cur = await conn.execute("SELECT pg_terminate_backend(%s)", (backend_pid,))
        assert (await cur.fetchone())[0]


async def _listening_again(url: str, watcher, connects: int) -> bool:
    return watcher.connects >= connects and (await version_info(url))["listening"]


async def _one_answer(url: str) -> dict:
    load = StreamLoad(url, 1, max_new_tokens=4)
    load.start()
    await load.wait_started(1)
    await load.stop()
    assert_all_completed(load.records)
    return {"model_version": load.records[0].model_version}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _start_server(database_url: str, model_dir: Path, data_dir: Path, port: int) -> subprocess.Popen:
    data_dir.mkdir(parents=True)
    env = {
        **os.environ,
        "DATABASE_URL": database_url,
        "MODEL": str(model_dir),
        "DATA_DIR": str(data_dir),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "ENGINE_THREADS": "1",
        "MAX_BATCH_SIZE": "4",
        "CONTEXT_LENGTH": "1024",
        "MAX_NEW_TOKENS_LIMIT": "256",
        "DEFAULT_MAX_NEW_TOKENS": "16",
    }
    log = open(data_dir / "server.log", "w")
    return subprocess.Popen([sys.executable, "-m", "server"], cwd=ROOT, env=env, stdout=log,
                            stderr=subprocess.STDOUT)


async def _healthy(url: str, process: subprocess.Popen) -> bool:
    if process.poll() is not None:
        raise AssertionError(f"the server on {url} exited with {process.returncode}: see its server.log")
    try:
        async with httpx.AsyncClient(base_url=url, timeout=5) as client:
            return (await client.get("/health")).status_code == 200
    except httpx.TransportError:
        return False
