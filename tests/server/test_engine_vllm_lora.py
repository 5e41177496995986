"""Runtime LoRA loading into vLLM (ENGINE_LORA_LOADING=vllm): a promoted adapter is loaded into
the engine before any request asks for it, a refused load leaves the old version serving, and
retired adapters are unloaded.

vLLM needs a GPU build and cannot run on these CPU machines, so the engine here is FakeVllm
(remote_testkit.py): a real HTTP server on a real port that implements the routes involved -
/health, /v1/models, /v1/load_lora_adapter, /v1/unload_lora_adapter and a streaming
/v1/chat/completions - with vLLM's request bodies, answers and error shapes (checked against
vLLM's source: vllm/entrypoints/openai/api_server.py and serving_models.py). It checks the
server against vLLM's wire format, not against vLLM itself. The server side is the real thing:
the app, its swap controller, the registry on PostgreSQL and NOTIFY.
"""

from __future__ import annotations

import asyncio
import json
import socket
from pathlib import Path

import pytest
from support.checkpoints import write_files

from deploy import registry
from remote_testkit import FakeVllm, serve_app
from server.engine.remote import AdapterNotLoaded, RemoteEngineConfig, RemoteEngineError, start_remote_engine
from server_testkit import connect, new_token
from swap_testkit import (
    ACTOR,
    BASE_ID,
    in_registry,
    load_events,
    own_database,
    swap_server,
    version_info,
    wait_for,
    wait_serving,
)

BASE_SERVED = "SmolLM2-135M-Instruct"  # the engine's --served-model-name (ENGINE_MODEL)
ENGINE_MOUNT = "/engine/checkpoints"  # where the engine mounts the server's checkpoint directory


def write_adapter(root: Path, checkpoint_id: str) -> Path:
    """A LoRA checkpoint in the real on-disk format (the engine never reads the weights here)."""
    files = {
        "adapter_config.json": json.dumps({"r": 16, "peft_type": "LORA", "lora_alpha": 32}).encode(),
        "adapter_model.safetensors": checkpoint_id.encode() * 64,
    }
    return write_files(root / checkpoint_id, files, checkpoint_id=checkpoint_id, parent_id=BASE_ID,
                       base_model=BASE_ID, kind="lora")


def mounted(root: Path):
    """How the fake engine finds a path it is given: under ENGINE_MOUNT, which is `root` here."""
    return lambda path: root / Path(path).relative_to(ENGINE_MOUNT)


@pytest.fixture
def swap_db(admin_url):
    with own_database(admin_url, "flywheel_vllm") as url:
        yield url


async def ask(base_url: str) -> dict:
    async with connect(base_url, new_token()) as ws:
        return await ws.chat("Hello?", params={"max_new_tokens": 16, "temperature": 0})


async def test_promotion_loads_the_adapter_first_a_refused_load_keeps_the_old_version_and_retired_ones_unload(
    swap_db, tiny_model_dir, tmp_path
):
    root = tmp_path / "checkpoints"
    root.mkdir()
    engine = FakeVllm(BASE_SERVED, seen_as=mounted(root))
    async with serve_app(engine.app) as engine_url, swap_server(
        swap_db, tmp_path / "server", None, tiny_model_dir,
        engine="remote", engine_url=engine_url, engine_model=BASE_SERVED, engine_health_interval=0.5,
        engine_lora_loading="vllm", engine_lora_path_map=f"{root}={ENGINE_MOUNT}", engine_lora_unload=True,
    ) as (base_url, _app):
        await wait_serving(base_url, BASE_ID)
        assert (await ask(base_url))["started"]["model_version"] == BASE_ID

        # 1. Promote a LoRA checkpoint: loaded under its id, from the engine's path, first.
        a = write_adapter(root, "ckpt-a")
        await in_registry(swap_db, lambda conn: registry.register(conn, a, actor=ACTOR))
        await in_registry(swap_db, lambda conn: registry.promote(conn, "ckpt-a", actor=ACTOR))
        await wait_serving(base_url, "ckpt-a")
        answer = await ask(base_url)
        assert answer["started"]["model_version"] == "ckpt-a" and answer["text"].startswith("ckpt-a says")
        calls = engine.routes_called()
        assert calls.count(("load", "ckpt-a")) == 1
        load = calls.index(("load", "ckpt-a"))
        assert engine.calls[load][1] == {"lora_name": "ckpt-a", "lora_path": f"{ENGINE_MOUNT}/ckpt-a"}
        assert load < calls.index(("chat", "ckpt-a"))  # no request named it before it was loaded
        assert [e.action for e in await load_events(swap_db, "ckpt-a")] == ["loaded"]

        # 2. A load the engine refuses: nothing asks for it, the old version keeps serving.
        engine.refuse["ckpt-b"] = (400, "LoRA rank 64 is greater than max_lora_rank 16.")
        b = write_adapter(root, "ckpt-b")
        await in_registry(swap_db, lambda conn: registry.register(conn, b, actor=ACTOR))
        await in_registry(swap_db, lambda conn: registry.promote(conn, "ckpt-b", actor=ACTOR))

        async def refused():
            info = await version_info(base_url)
            return info if (info["last_failure"] or {}).get("version") == "ckpt-b" else None

        info = await wait_for(refused, "the replica to refuse ckpt-b")
        assert info["model_version"] == "ckpt-a" and info["registry_serving"] == "ckpt-b" and not info["in_sync"]
        assert "max_lora_rank 16" in info["last_failure"]["error"] and engine_url in info["last_failure"]["error"]
        assert (await ask(base_url))["started"]["model_version"] == "ckpt-a"
        assert ("chat", "ckpt-b") not in engine.routes_called() and "ckpt-b" not in engine.adapters
        failed = await load_events(swap_db, "ckpt-b")
        assert [e.action for e in failed] == ["load_failed"] and "max_lora_rank" in failed[0].reason

        # 3. The operator rolls the registry back and promotes another: once ckpt-a has no
        # streams left it is unloaded from the engine (ENGINE_LORA_UNLOAD); the base never is.
        await in_registry(swap_db, lambda conn: registry.rollback(conn, actor=ACTOR))
        c = write_adapter(root, "ckpt-c")
        await in_registry(swap_db, lambda conn: registry.register(conn, c, actor=ACTOR))
        await in_registry(swap_db, lambda conn: registry.promote(conn, "ckpt-c", actor=ACTOR))
        await wait_serving(base_url, "ckpt-c")
        async def unloaded():
            return ("unload", "ckpt-a") in engine.routes_called()

        await wait_for(unloaded, "ckpt-a to be unloaded")
        assert set(engine.adapters) == {"ckpt-c"}
        assert not any(route == "unload" and name in (BASE_SERVED, BASE_ID) for route, name in engine.routes_called())

        # 4. Rolling back to an unloaded adapter loads it again.
        await in_registry(swap_db, lambda conn: registry.rollback(conn, actor=ACTOR))
        await wait_serving(base_url, "ckpt-a")
        assert engine.routes_called().count(("load", "ckpt-a")) == 2
        assert (await ask(base_url))["text"].startswith("ckpt-a says")


async def test_a_promotion_heard_while_the_engine_is_down_is_applied_once_it_answers(swap_db, tiny_model_dir, tmp_path):
    """No second notification comes: the replica applies the state it heard when its engine is
    back (here: started late on the port ENGINE_URL names)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    engine = FakeVllm(BASE_SERVED, seen_as=mounted(tmp_path))
    async with swap_server(
        swap_db, tmp_path / "server", None, tiny_model_dir,
        engine="remote", engine_url=f"http://127.0.0.1:{port}", engine_model=BASE_SERVED,
        engine_health_interval=0.2, engine_lora_loading="vllm", engine_lora_path_map=f"{tmp_path}={ENGINE_MOUNT}",
    ) as (base_url, _app):

        async def heard(version: str):
            info = await version_info(base_url)
            return info if info["registry_serving"] == version else None

        info = await wait_for(lambda: heard(BASE_ID), "the replica to read the registry")
        assert info["model_version"] is None and not info["in_sync"]  # its engine does not answer
        path = write_adapter(tmp_path, "ckpt-a")
        await in_registry(swap_db, lambda conn: registry.register(conn, path, actor=ACTOR))
        await in_registry(swap_db, lambda conn: registry.promote(conn, "ckpt-a", actor=ACTOR))
        await wait_for(lambda: heard("ckpt-a"), "the replica to hear the promotion")

        async with serve_app(engine.app, port=port):
            await wait_serving(base_url, "ckpt-a")
            assert engine.routes_called()[0] == ("load", "ckpt-a")


def engine_config(url: str, root: Path, **overrides) -> RemoteEngineConfig:
    values = dict(url=url, served_model=BASE_SERVED, context_length=1024, health_interval_s=0.5,
                  lora_loading="vllm", lora_path_map=((str(root), ENGINE_MOUNT),))
    return RemoteEngineConfig(**{**values, **overrides})


async def test_two_replicas_loading_one_adapter_at_once_both_serve_it(tiny_model_dir, tmp_path):
    """vLLM answers the second load of a name with 400 "has already been loaded": that is a
    loaded adapter, not a failure."""
    engine = FakeVllm(BASE_SERVED, seen_as=mounted(tmp_path), load_delay_s=0.3)
    path = write_adapter(tmp_path, "ckpt-a")
    async with serve_app(engine.app) as url:
        replicas = [await start_remote_engine(tiny_model_dir, engine_config(url, tmp_path)) for _ in range(2)]
        try:
            await asyncio.gather(*(replica.load_version("ckpt-a", path) for replica in replicas))
            assert all("ckpt-a" in replica.versions() for replica in replicas)
            assert engine.routes_called() == [("load", "ckpt-a"), ("load", "ckpt-a")]
            # A replica that starts later finds it listed and asks for nothing.
            late = await start_remote_engine(tiny_model_dir, engine_config(url, tmp_path))
            replicas.append(late)
            await late.load_version("ckpt-a", path)
            assert engine.routes_called() == [("load", "ckpt-a"), ("load", "ckpt-a")]
        finally:
            for replica in replicas:
                await replica.close()


async def test_an_engine_without_runtime_loading_says_what_to_set(tiny_model_dir, tmp_path):
    engine = FakeVllm(BASE_SERVED, runtime_updating=False)
    path = write_adapter(tmp_path, "ckpt-a")
    async with serve_app(engine.app) as url:
        remote = await start_remote_engine(tiny_model_dir, engine_config(url, tmp_path))
        try:
            with pytest.raises(AdapterNotLoaded, match="VLLM_ALLOW_RUNTIME_LORA_UPDATING=True"):
                await remote.load_version("ckpt-a", path)
            assert remote.versions() == [remote.default_version] and remote.ready
        finally:
            await remote.close()


async def test_blue_green_loads_the_adapters_on_the_new_engine_before_switching(tiny_model_dir, tmp_path):
    blue, green = (FakeVllm(BASE_SERVED, seen_as=mounted(tmp_path)) for _ in range(2))
    refusing = FakeVllm(BASE_SERVED, seen_as=mounted(tmp_path))
    refusing.refuse["ckpt-a"] = (500, "CUDA out of memory")
    path = write_adapter(tmp_path, "ckpt-a")
    async with serve_app(blue.app) as blue_url, serve_app(green.app) as green_url, \
            serve_app(refusing.app) as refusing_url:
        remote = await start_remote_engine(tiny_model_dir, engine_config(blue_url, tmp_path))
        try:
            await remote.load_version("ckpt-a", path, make_default=True)
            with pytest.raises(RemoteEngineError, match="CUDA out of memory") as refused:
                await remote.switch_endpoint(refusing_url)
            assert refusing_url in str(refused.value) and remote.url == blue_url

            assert await remote.switch_endpoint(green_url)
            assert remote.url == green_url and green.adapters == {"ckpt-a": f"{ENGINE_MOUNT}/ckpt-a"}
            assert green.routes_called() == [("load", "ckpt-a")]
            _, final = await remote.submit(_prompt(remote), _params()).collect()
            assert final.finish_reason in ("stop", "length") and green.routes_called()[-1] == ("chat", "ckpt-a")
        finally:
            await remote.close()


def _prompt(remote):
    from server.prompt import build_prompt

    return build_prompt([{"role": "user", "content": "Hi"}], remote.tokenizer,
                        context_length=remote.context_length, max_new_tokens=8)


def _params():
    from server.engine.base import SamplingParams

    return SamplingParams(temperature=0, max_new_tokens=8)
