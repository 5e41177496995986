"""Blue/green between two real remote engines, driven through the registry as operators do it
(`python -m deploy engine-url URL`): every replica checks the new engine answers, new requests
go there, streams in flight finish on the old one, a bad URL is refused with the old one serving,
and a replica that starts (or reconnects) reads the URL asked for.

The engines are two real `transformers serve` processes on the tiny model (remote_testkit.py),
which count the chat requests they receive in their own logs; the servers are the real app with
ENGINE=remote, a real PostgreSQL and real NOTIFYs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from pathlib import Path

import httpx
import pytest

from deploy import endpoints, registry
from remote_testkit import BASE_REPO
from server_testkit import connect, new_token
from swap_testkit import BASE_ID, in_registry, own_database, swap_server, version_info, wait_for, wait_serving

ROOT = Path(__file__).resolve().parents[2]
LONG = 900  # tokens: long enough to still be streaming across a switch


@pytest.fixture
def bg_db(admin_url):
    with own_database(admin_url, "flywheel_bluegreen") as url:
        yield url


def remote_server(db_url: str, tmp_path: Path, model_dir: Path, engine_url: str, replica: str):
    """The app with a remote engine at `engine_url`, named `replica` in the registry."""
    return swap_server(db_url, tmp_path / replica, None, model_dir, engine="remote", engine_url=engine_url,
                       engine_model=BASE_REPO, engine_health_interval=0.5, replica_name=replica,
                       max_new_tokens_limit=LONG)


async def deploy_cli(db_url: str, *args: str) -> tuple[int, str, str]:
    """`python -m deploy ARGS` in a subprocess, as an operator runs it."""
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "deploy", *args, cwd=ROOT,
        env={**os.environ, "DATABASE_URL": db_url, "LOG_LEVEL": "WARNING", "USER": "ops"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 120)
    return process.returncode, out.decode(), err.decode()


async def wait_engine(base_url: str, url: str) -> dict:
    """Until this replica's new requests go to `url` and it serves what the registry says."""

    async def check():
        info = await version_info(base_url)
        return info if info["engine_url"] == url and info["in_sync"] else None

    return await wait_for(check, f"{base_url} to use the engine at {url}")


async def metric(base_url: str, name: str) -> float:
    async with httpx.AsyncClient(base_url=base_url, timeout=30) as client:
        text = (await client.get("/metrics/")).text
    found = [line.rsplit(" ", 1)[1] for line in text.splitlines() if line.startswith(name + " ")
             or line.startswith(name + "{")]
    return float(found[0]) if found else 0.0


class Stream:
    """One websocket answer, read in the background: started before a switch, checked after."""

    def __init__(self, base_url: str, max_new_tokens: int):
        self.first_token = asyncio.Event()
        self.task = asyncio.create_task(self._run(base_url, max_new_tokens))

    async def _run(self, base_url: str, max_new_tokens: int) -> dict:
        async with connect(base_url, new_token()) as ws:
            await ws.send({"type": "message", "content": "Tell me about the sea.",
                           "params": {"max_new_tokens": max_new_tokens, "temperature": 0}})
            started = await ws.expect("started")
            pieces, frame = [], await ws.recv(timeout=120)
            while frame["type"] == "token":
                pieces.append(frame["text"])
                self.first_token.set()
                frame = await ws.recv(timeout=120)
            return {"started": started, "text": "".join(pieces), "end": frame}

    async def result(self) -> dict:
        return await asyncio.wait_for(self.task, 300)


async def test_engine_url_moves_new_requests_and_streams_in_flight_finish(bg_db, blue, green, tiny_model_dir, tmp_path):
    async with remote_server(bg_db, tmp_path, tiny_model_dir, blue.url, "web-a") as (base_url, _):
        await wait_serving(base_url, BASE_ID)
        info = await version_info(base_url)
        assert (info["engine_url"], info["registry_engine_url"]) == (blue.url, None)  # ENGINE_URL serves

        blue_before, green_before = blue.chat_requests_received(), green.chat_requests_received()
        old = Stream(base_url, LONG)
        await asyncio.wait_for(old.first_token.wait(), 60)
        request, _ = await in_registry(bg_db, lambda conn: endpoints.request_switch(
            conn, green.url, actor="ops@test", reason="green runs the new build"))
        info = await wait_engine(base_url, green.url)
        assert not old.task.done(), "the old stream ended before the switch: make LONG longer"
        assert info["registry_engine_url"] == green.url
        switch = info["last_engine_switch"]
        assert (switch["previous"], switch["url"], switch["request_id"]) == (blue.url, green.url, request.id)
        assert switch["draining"] == 1 and info["engine_draining_urls"] == [blue.url]

        new = [Stream(base_url, 8) for _ in range(3)]
        answers = [await stream.result() for stream in new]
        finished = await old.result()
        # The stream started before the switch ran to its end on blue; nothing was cut.
        assert finished["end"]["type"] == "done" and finished["end"]["finish_reason"] == "length"
        assert finished["end"]["usage"]["completion_tokens"] == LONG
        assert all(a["end"]["type"] == "done" and a["end"]["finish_reason"] == "length" for a in answers)
        # Each engine's own log: only the old stream on blue, every new one on green.
        assert blue.chat_requests_received() == blue_before + 1
        assert green.chat_requests_received() == green_before + 3

        async def drained():
            return (await version_info(base_url))["engine_draining_urls"] == []

        await wait_for(drained, "blue's connections to close")
        assert await metric(base_url, "flywheel_engine_switches_total") == 1
        assert await metric(base_url, "flywheel_engine_switch_failures_total") == 0
        state = await in_registry(bg_db, registry.read_state)
        [outcome] = await in_registry(bg_db, lambda conn: endpoints.outcomes(conn, state))
        assert (outcome.replica, outcome.action, outcome.url) == ("web-a", "switched", green.url)
        assert outcome.details["previous"] == blue.url and outcome.details["switched"] is True


async def test_a_bad_engine_url_is_refused_and_nothing_is_dropped(bg_db, green, tiny_model_dir, tmp_path):
    async with remote_server(bg_db, tmp_path, tiny_model_dir, green.url, "web-b") as (base_url, _):
        await wait_serving(base_url, BASE_ID)
        green_before = green.chat_requests_received()
        old = Stream(base_url, LONG)
        await asyncio.wait_for(old.first_token.wait(), 60)
        dead = "http://127.0.0.1:9"  # discard: nothing answers there
        code, out, err = await deploy_cli(bg_db, "engine-url", dead, "--reason", "typo", "--json")
        assert code == 0, err
        assert json.loads(out)["request"]["actor"].startswith("ops@")

        async def refused():
            info = await version_info(base_url)
            failure = info["last_engine_switch_failure"]
            return info if failure and failure["url"] == dead else None

        info = await wait_for(refused, "the replica to refuse the dead URL")
        assert info["engine_url"] == green.url and info["registry_engine_url"] == dead
        assert not info["in_sync"] and info["last_engine_switch"] is None
        assert dead in info["last_engine_switch_failure"]["error"] and green.url in info["last_engine_switch_failure"]["error"]
        assert await metric(base_url, "flywheel_engine_switch_failures_total") == 1
        assert await metric(base_url, 'flywheel_engine_endpoint{role="current",url="%s"}' % green.url) == 1

        # The stream in flight went on; new requests still go to green.
        finished = await old.result()
        assert finished["end"]["type"] == "done" and finished["end"]["usage"]["completion_tokens"] == LONG
        answer = await Stream(base_url, 8).result()
        assert answer["end"]["type"] == "done"
        assert green.chat_requests_received() == green_before + 2

        # The operator sees it, and asking for green again puts the replica back in sync.
        code, out, _ = await deploy_cli(bg_db, "status", "--json")
        [failure] = json.loads(out)["engine_switch_failures"]
        assert (failure["replica"], failure["url"]) == ("web-b", dead) and dead in failure["reason"]
        await in_registry(bg_db, lambda conn: endpoints.request_switch(conn, green.url, actor="ops@test"))
        info = await wait_engine(base_url, green.url)
        assert info["registry_engine_url"] == green.url and info["last_engine_switch"] is None  # it was there


async def test_replicas_read_the_engine_url_on_start_and_one_can_move_alone(bg_db, blue, green, tiny_model_dir, tmp_path):
    # Asked for before any server runs: both start on blue (ENGINE_URL) and move to green on
    # their first read of the registry, with no notification.
    await in_registry(bg_db, lambda conn: endpoints.request_switch(conn, green.url, actor="ops@test"))
    async with remote_server(bg_db, tmp_path, tiny_model_dir, blue.url, "web-a") as (url_a, _), \
            remote_server(bg_db, tmp_path, tiny_model_dir, blue.url, "web-b") as (url_b, _):
        for base_url in (url_a, url_b):
            await wait_engine(base_url, green.url)

        # One replica back to blue alone (one NOTIFY, heard by both; only web-b moves).
        await in_registry(bg_db, lambda conn: endpoints.request_switch(
            conn, blue.url, actor="ops@test", replica="web-b", reason="compare engines"))
        info_b = await wait_engine(url_b, blue.url)
        assert info_b["registry_engine_url"] == blue.url
        started = time.monotonic()
        while time.monotonic() - started < 1.0:  # web-a stays where it is
            info_a = await version_info(url_a)
            assert (info_a["engine_url"], info_a["registry_engine_url"]) == (green.url, green.url)
            await asyncio.sleep(0.1)
        blue_before, green_before = blue.chat_requests_received(), green.chat_requests_received()
        await Stream(url_b, 4).result()
        await Stream(url_a, 4).result()
        assert (blue.chat_requests_received(), green.chat_requests_received()) == (blue_before + 1, green_before + 1)
