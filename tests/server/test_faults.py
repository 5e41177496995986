"""Faults, end to end on the tiny model and a real PostgreSQL: the database stopped and started
again under load (a PostgreSQL this test owns, never the machine's shared one), an answer that
finishes while it is down, `kill -9` of a server process with acks in flight, and SIGTERM in
the middle of websocket and SSE streams."""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import signal
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psycopg
import pytest
import websockets

from bench.harness import OwnedPostgres, free_port, start_process
from feedback.migrate import migrate
from server_testkit import connect, make_settings, new_token, serve, ws_url

# A long answer: the tiny random model at the highest temperature almost never samples EOS.
LONG = {"temperature": 2.0, "max_new_tokens": 900}
# Long enough to outlast stopping the database (well under a second) after its first token.
MEDIUM = {"temperature": 2.0, "max_new_tokens": 400}


@pytest.fixture
def owned_pg():
    pg = OwnedPostgres()
    migrate(pg.url)
    yield pg
    pg.close()


async def _status(client: httpx.AsyncClient, token: str) -> tuple[int, dict, float]:
    started = time.monotonic()
    response = await client.get("/api/conversations", headers={"Authorization": f"Bearer {token}"})
    return response.status_code, response, time.monotonic() - started


async def test_a_database_outage_is_503_with_retry_after_and_service_returns_within_seconds(
    owned_pg, engine, tmp_path
):
    settings = make_settings(owned_pg.url, tmp_path, db_wait_timeout=1.0, db_reconnect_timeout=1.0,
                             db_pool_min=4, db_pool_max=8)
    tokens = [new_token() for _ in range(4)]
    async with serve(settings, engine) as url, httpx.AsyncClient(base_url=url, timeout=10) as client:
        async with connect(url, tokens[0]) as ws:
            await ws.chat("before the outage")
            for token in tokens:  # every pooled connection has been used before the outage
                assert (await _status(client, token))[0] == 200

            # Load all along: four clients polling through the outage and the recovery.
            polled: list[int] = []
            polling = True

            async def poll(token: str) -> None:
                while polling:
                    polled.append((await _status(client, token))[0])
                    await asyncio.sleep(0.05)

            pollers = [asyncio.create_task(poll(new_token())) for _ in range(4)]
            await asyncio.to_thread(owned_pg.stop)
            for token in tokens:
                status, response, took = await _status(client, token)
                assert status == 503, response.text
                assert response.json()["code"] == "database_unavailable"
                assert int(response.headers["Retry-After"]) >= 1
                assert took < 3.0, f"a request waited {took:.1f} s while the database was down"
            # The OpenAI API in OpenAI's error shape, and a thumb: 503 too.
            response = await client.post("/v1/chat/completions", headers={"Authorization": f"Bearer {tokens[1]}"},
                                         json={"messages": [{"role": "user", "content": "hi"}]})
            assert response.status_code == 503 and "Retry-After" in response.headers
            assert response.json()["error"]["code"] == "database_unavailable"
            response = await client.post(f"/api/messages/{uuid.uuid4()}/feedback", json={"rating": 1},
                                         headers={"Authorization": f"Bearer {tokens[2]}"})
            assert response.status_code == 503 and response.json()["code"] == "database_unavailable"
            # The open websocket answers with the matching frame and stays usable.
            await ws.send({"type": "message", "content": "while it is down"})
            error = await ws.expect("error", timeout=10)
            assert error["code"] == "database_unavailable"
            # A new websocket: the frame, then close code 1013 (try again later).
            async with websockets.connect(ws_url(url, new_token())) as conn:
                assert json.loads(await conn.recv())["code"] == "database_unavailable"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await conn.recv()
                assert closed.value.rcvd.code == 1013
                assert closed.value.rcvd.reason == "database_unavailable"

            await asyncio.to_thread(owned_pg.start)
            back_at = time.monotonic()
            while (await _status(client, tokens[0]))[0] != 200:
                assert time.monotonic() - back_at < 5, "no success within 5 s of the database returning"
                await asyncio.sleep(0.1)
            recovered_s = time.monotonic() - back_at
            # Connections left from before the outage are discarded at checkout, not handed out.
            statuses = [(await _status(client, tokens[i % 4]))[0] for i in range(25)]
            assert statuses == [200] * 25, statuses
            answer = await ws.chat("after the outage")
            assert answer["done"]["finish_reason"] in ("stop", "length")
            polling = False
            await asyncio.gather(*pollers)
    assert recovered_s < 5
    assert set(polled) == {200, 503}, f"answers under load were {sorted(set(polled))}"


async def test_an_answer_finished_while_the_database_is_down_is_retried_then_stored(
    owned_pg, engine, tmp_path
):
    settings = make_settings(owned_pg.url, tmp_path, answer_store_retry_s=30,
                             max_new_tokens_limit=900)
    async with serve(settings, engine) as url, connect(url, new_token()) as ws:
        await ws.send({"type": "message", "content": "a long one", "params": MEDIUM})
        started = await ws.expect("started")
        await ws.expect("token")
        await asyncio.to_thread(owned_pg.stop)
        # Back before the retries run out: the answer is stored and ends normally.
        restart = asyncio.create_task(_start_after(owned_pg, 3.0))
        rest = await ws.finish(started)
        await restart
        assert rest["done"]["finish_reason"] in ("stop", "length")
        async with await psycopg.AsyncConnection.connect(owned_pg.url) as db:
            cur = await db.execute("SELECT count(*) FROM messages WHERE id = %s",
                                   (started["message_id"],))
            assert (await cur.fetchone())[0] == 1


async def test_an_answer_that_cannot_be_stored_says_so_and_leaves_its_question_alone(
    owned_pg, engine, tmp_path
):
    settings = make_settings(owned_pg.url, tmp_path, answer_store_retry_s=1.0,
                             max_new_tokens_limit=900)
    async with serve(settings, engine) as url, connect(url, new_token()) as ws:
        await ws.send({"type": "message", "content": "a long one", "params": MEDIUM})
        started = await ws.expect("started")
        await ws.expect("token")
        await asyncio.to_thread(owned_pg.stop)
        frames = []
        while not frames or frames[-1]["type"] != "done":
            frames.append(await ws.recv())
        error, done = [f for f in frames if f["type"] != "token"]
        assert error["type"] == "error" and error["code"] == "answer_not_stored"
        assert started["message_id"] in error["message"] and started["parent_id"] in error["message"]
        assert "nothing was stored" not in error["message"]
        assert done["finish_reason"] == "error"
        await asyncio.to_thread(owned_pg.start)
        # The documented state: the question is stored, with no answer under it.
        async with await psycopg.AsyncConnection.connect(owned_pg.url) as db:
            cur = await db.execute(
                "SELECT role, (SELECT count(*) FROM messages c WHERE c.parent_id = m.id) "
                "FROM messages m WHERE id = %s", (started["parent_id"],))
            assert await cur.fetchone() == ("user", 0)
            cur = await db.execute("SELECT count(*) FROM messages WHERE id = %s",
                                   (started["message_id"],))
            assert (await cur.fetchone())[0] == 0


async def _start_after(pg: OwnedPostgres, seconds: float) -> None:
    await asyncio.sleep(seconds)
    await asyncio.to_thread(pg.start)


# -- real server processes -----------------------------------------------------------------------


def _server(db_url: str, model_dir: Path, workdir: Path, **env) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "server.log"
    process = start_process("server", [], {
        "DATABASE_URL": db_url, "ALLOW_ANONYMOUS": "true", "MODEL": str(model_dir),
        "DATA_DIR": str(workdir), "HOST": "127.0.0.1", "PORT": str(port), "ENGINE_THREADS": "1",
        "MAX_BATCH_SIZE": "8", "CONTEXT_LENGTH": "1024", "MAX_NEW_TOKENS_LIMIT": "900",
        "DEFAULT_MAX_NEW_TOKENS": "16", "RATE_LIMIT_PER_MINUTE": "10000",
        "PYTHONPATH": os.environ.get("PYTHONPATH", ""), **env,
    }, log)
    return process, f"http://127.0.0.1:{port}", log


async def _wait_healthy(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=url, timeout=5) as client:
        while time.monotonic() < deadline:
            assert process.poll() is None, f"the server exited: {log.read_text()[-3000:]}"
            try:
                if (await client.get("/health")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.25)
    raise AssertionError(f"the server was not healthy after {timeout} s")


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.kill()
        process.wait()


async def test_kill_9_of_the_server_loses_no_acked_feedback(db_url, tiny_model_dir, tmp_path):
    process, url, log = _server(db_url, tiny_model_dir, tmp_path / "server")
    acked: list[tuple[int, str]] = []  # (rating id, reason) of every acked thumb
    try:
        await _wait_healthy(url, process, log)
        sockets = []
        async with contextlib.AsyncExitStack() as stack:
            for _ in range(4):
                ws = await stack.enter_async_context(connect(url, new_token()))
                answer = await ws.chat("something to rate")
                sockets.append((ws, answer["started"]["message_id"]))
            await _vote_until_killed(process, sockets, acked)
    finally:
        _stop(process)
    # Each thumb is a row of rating_changes (a rating's history): every acked one is there.
    async with await psycopg.AsyncConnection.connect(db_url) as db:
        cur = await db.execute("SELECT rating_id, reason FROM rating_changes WHERE rating_id = ANY(%s)",
                               (list({rating_id for rating_id, _ in acked}),))
        present = {tuple(row) for row in await cur.fetchall()}
    assert len(acked) >= 60
    missing = set(acked) - present
    assert not missing, f"{len(missing)} of {len(acked)} acked thumbs are missing"


async def _vote_until_killed(process: subprocess.Popen, sockets: list, acked: list) -> None:
    """Thumbs on four sockets at once, every ack recorded, until the server is killed with 60+
    acked and more in flight."""

    async def vote(ws, message_id):
        for n in itertools.count():
            reason = f"vote {n}"
            await ws.send({"type": "feedback", "message_id": message_id, "rating": 1 - 2 * (n % 2),
                           "reason": reason})
            acked.append(((await ws.expect("ack"))["id"], reason))

    voters = [asyncio.create_task(vote(ws, mid)) for ws, mid in sockets]
    while len(acked) < 60:
        assert not any(v.done() for v in voters), [v.exception() for v in voters if v.done()]
        await asyncio.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    await asyncio.gather(*voters, return_exceptions=True)


async def _read_ws(ws, started: dict, frames: list) -> None:
    while True:
        frame = await ws.recv()
        frames.append(frame)
        if frame["type"] == "done":
            return


async def _read_sse(client: httpx.AsyncClient, body: dict, events: list) -> None:
    async with client.stream("POST", "/v1/chat/completions", json=body) as response:
        assert response.status_code == 200
        async for line in response.aiter_lines():
            if line.startswith("data: "):
                events.append(line[len("data: "):])


def _sse_text(events: list) -> tuple[str, dict]:
    chunks = [json.loads(e) for e in events if e != "[DONE]"]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c.get("choices"))
    return text, chunks[-1]


async def test_sigterm_drains_websocket_and_sse_streams_and_exits_0(db_url, tiny_model_dir, tmp_path):
    process, url, log = _server(db_url, tiny_model_dir, tmp_path / "server", SHUTDOWN_TIMEOUT="4")
    try:
        await _wait_healthy(url, process, log)
        token = new_token()
        headers = {"Authorization": f"Bearer {token}"}
        async with connect(url, token) as short_ws, connect(url, token) as long_ws, \
                httpx.AsyncClient(base_url=url, headers=headers, timeout=60) as client:
            await long_ws.send({"type": "message", "content": "long", "params": LONG})
            long_started = await long_ws.expect("started")
            long_frames: list = []
            long_reader = asyncio.create_task(_read_ws(long_ws, long_started, long_frames))
            sse_events: list = []
            sse_reader = asyncio.create_task(_read_sse(client, {
                "messages": [{"role": "user", "content": "long over SSE"}], "stream": True,
                "temperature": 2.0, "max_tokens": 900}, sse_events))
            await short_ws.send({"type": "message", "content": "short",
                                 "params": {"temperature": 2.0, "max_new_tokens": 40}})
            short_started = await short_ws.expect("started")
            short_frames = [await short_ws.expect("token")]
            while len(sse_events) < 3 or len(long_frames) < 3:
                await asyncio.sleep(0.02)

            process.send_signal(signal.SIGTERM)
            await _read_ws(short_ws, short_started, short_frames)
            # Running answers finish: the short one normally, within SHUTDOWN_TIMEOUT.
            assert short_frames[-1]["finish_reason"] in ("stop", "length")
            # While draining, an open socket gets no new answer, but its thumbs are still stored.
            await short_ws.send({"type": "message", "content": "one more"})
            assert (await short_ws.expect("error"))["code"] == "shutting_down"
            await short_ws.send({"type": "feedback", "message_id": short_started["message_id"], "rating": 1})
            await short_ws.expect("ack")
            # New work is refused while draining: HTTP 503, a websocket 1012 with a reason.
            refused = await client.get("/health")
            assert refused.status_code == 503 and refused.json()["code"] == "shutting_down"
            assert "Retry-After" in refused.headers
            async with websockets.connect(ws_url(url, new_token())) as conn:
                assert json.loads(await conn.recv())["code"] == "shutting_down"
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await conn.recv()
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "shutting_down")
            # The long ones are cancelled after SHUTDOWN_TIMEOUT, each with its final frame.
            await asyncio.wait_for(long_reader, 30)
            await asyncio.wait_for(sse_reader, 30)
            assert long_frames[-1]["type"] == "done"
            assert long_frames[-1]["finish_reason"] == "cancelled"
            assert sse_events[-1] == "[DONE]"
            sse_text, last_chunk = _sse_text(sse_events)
            assert last_chunk["choices"][0]["finish_reason"] == "cancelled"
            # Then every websocket is closed with 1012 "shutting_down".
            for ws in (short_ws, long_ws):
                with pytest.raises(websockets.ConnectionClosed) as closed:
                    await ws.recv(timeout=30)
                assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (1012, "shutting_down")
        code = await asyncio.to_thread(process.wait, 60)
    finally:
        _stop(process)
    output = log.read_text()
    assert code == 0, output[-3000:]
    assert "Traceback" not in output, output[-3000:]

    # What was stored is exactly what each client received.
    received = {
        short_started["message_id"]: _ws_text(short_frames),
        long_started["message_id"]: _ws_text(long_frames),
        last_chunk["id"]: sse_text,
    }
    async with await psycopg.AsyncConnection.connect(db_url) as db:
        cur = await db.execute("SELECT id::text, content, finish_reason FROM messages WHERE id::text = ANY(%s)",
                               (list(received),))
        stored = {row[0]: (row[1], row[2]) for row in await cur.fetchall()}
    assert {k: v[0] for k, v in stored.items()} == received
    assert stored[long_started["message_id"]][1] == "cancelled"
    assert stored[last_chunk["id"]][1] == "cancelled"


def _ws_text(frames: list) -> str:
    return "".join(f["text"] for f in frames if f["type"] == "token")
