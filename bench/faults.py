"""Reliability benchmark: the server under real load while it is fed bad inputs, attacked across
users, and has its database stopped, its process killed with -9 and SIGTERMed mid-stream.

    .venv/bin/python bench/faults.py                      # SmolLM2 (the converted default), 3 minutes
    .venv/bin/python bench/faults.py --model DIR --minutes 0.5   # e.g. the tests' tiny model

What runs, against a real `python -m server` on a PostgreSQL of its own (pgserver in a temp
directory: stopping it touches nothing else):
1. load: IDLE open websockets (one user each) and STREAMS users chatting back to back over
   the websocket, for MINUTES; the server's memory (RSS) is sampled throughout;
2. bad inputs, while the load streams: poisoned sampling parameters (temperature / top_p
   1e-300, 5e-324, 1e-40; over the websocket and /v1/chat/completions), NUL and lone-surrogate
   text in every text field, 100 KB of nested brackets, lenient types (`"4"`, `true`, `1.0`);
   each must be refused with a 4xx / typed error frame (a poisoned temperature may instead be
   answered normally), never a 5xx, and the bystanders' answers must end normally;
3. cross-user: a second user tries every endpoint and frame type on the first user's ids;
4. the database stopped for DB_DOWN seconds under load (503s expected), then started again:
   the time until requests succeed again;
5. `kill -9` of the server with thumbs in flight: every acked thumb must be stored; the server is
   started again;
6. SIGTERM with websocket and SSE streams running: each must end with its final frame, the
   stored text must equal what was received, and the process must exit 0.

It prints the figures README's "Reliability and security" section quotes and writes them as
JSON to bench/results/faults.json (`--out`). Exit status 1 when any check failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import secrets
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402
import psutil  # noqa: E402
import psycopg  # noqa: E402
import websockets  # noqa: E402

from bench.harness import OwnedPostgres, free_port, run_until_terminated, start_process  # noqa: E402

log = logging.getLogger("bench.faults")

PROMPTS = ["Tell me about the history of bread.", "How do volcanoes form?", "Explain photosynthesis.",
           "What makes a good story?", "Describe the water cycle.", "How do airplanes fly?"]
DEEP_JSON = "[" * 100_000


def _token(kind: str) -> str:
    return f"bench-{kind}-{secrets.token_hex(12)}"


def _ws_url(base: str, token: str) -> str:
    return base.replace("http://", "ws://") + f"/ws?token={token}"


@dataclass
class Report:
    started_at: str
    model: str
    settings: dict
    machine: dict
    load: dict = field(default_factory=dict)
    bad_inputs: dict = field(default_factory=dict)
    cross_user: dict = field(default_factory=dict)
    database_outage: dict = field(default_factory=dict)
    kill_9: dict = field(default_factory=dict)
    sigterm: dict = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


# -- the server ---------------------------------------------------------------------------------


class Server:
    """`python -m server` on the owned PostgreSQL; started again after a kill."""

    def __init__(self, args, database_url: str, model_dir: Path, workdir: Path):
        self.args, self.database_url, self.model_dir, self.workdir = args, database_url, model_dir, workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None
        self.starts = 0

    async def start(self) -> float:
        self.starts += 1
        env = {
            "DATABASE_URL": self.database_url, "MODEL": str(self.model_dir),
            "DATA_DIR": str(self.workdir / "data"), "HOST": "127.0.0.1", "PORT": str(self.port),
            "ALLOW_ANONYMOUS": "true", "RATE_LIMIT_PER_MINUTE": "100000", "MAX_NEW_TOKENS_LIMIT": "512",
            "MAX_CONCURRENT_GENERATIONS": "8", "SHUTDOWN_TIMEOUT": str(self.args.shutdown_timeout),
            "LOG_LEVEL": "INFO",
        }
        if self.args.engine_threads:
            env["ENGINE_THREADS"] = str(self.args.engine_threads)
        self.process = start_process("server", [], env, self.workdir / f"server-{self.starts}.log")
        started = time.monotonic()
        async with httpx.AsyncClient(base_url=self.url, timeout=5) as client:
            while time.monotonic() - started < self.args.start_timeout_s:
                if self.process.poll() is not None:
                    raise SystemExit(f"the server exited with {self.process.returncode}: see {self.log}")
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/health")).status_code == 200:
                        return time.monotonic() - started
                await asyncio.sleep(0.25)
        raise SystemExit(f"the server was not healthy after {self.args.start_timeout_s} s")

    @property
    def log(self) -> Path:
        return self.workdir / f"server-{self.starts}.log"

    def rss_mb(self) -> float | None:
        try:
            return psutil.Process(self.process.pid).memory_info().rss / 2**20
        except (psutil.Error, AttributeError):
            return None

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


# -- clients ------------------------------------------------------------------------------------


class Chatter:
    """One user chatting over the websocket back to back until stopped; every answer thumbed."""

    def __init__(self, url: str, max_new_tokens: int):
        self.url, self.max_new_tokens, self.token = url, max_new_tokens, _token("stream")
        self.finished: dict[str, int] = {}  # finish_reason -> count
        self.errors: list[str] = []
        self.stopping = False

    async def run(self) -> None:
        try:
            async with websockets.connect(_ws_url(self.url, self.token), max_size=None) as ws:
                n = 0
                while not self.stopping:
                    await ws.send(json.dumps({"type": "message", "content": PROMPTS[n % len(PROMPTS)],
                                              "params": {"max_new_tokens": self.max_new_tokens}}))
                    n += 1
                    reason, message_id = await _read_answer(ws)
                    self.finished[reason] = self.finished.get(reason, 0) + 1
                    if message_id:
                        await ws.send(json.dumps({"type": "feedback", "message_id": message_id, "rating": 1}))
                        await _next_of(ws, {"ack", "error"})
        except Exception as exc:  # noqa: BLE001 - a dropped connection is a figure, not a crash
            if not self.stopping:
                self.errors.append(f"{type(exc).__name__}: {exc}")


async def _next_of(ws, kinds: set[str], timeout: float = 120) -> dict:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] in kinds:
            return frame


async def _read_answer(ws, timeout: float = 300) -> tuple[str, str | None]:
    """Frames of one answer to its end: (finish_reason, answer id), or ('error:CODE', None)."""
    message_id = None
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if frame["type"] == "started":
            message_id = frame["message_id"]
        elif frame["type"] == "error" and message_id is None:
            return f"error:{frame['code']}", None
        elif frame["type"] == "done":
            return frame["finish_reason"], message_id


class Load:
    """IDLE idle websockets and STREAMS chatters, and the server's memory over time."""

    def __init__(self, server: Server, idle: int, streams: int, max_new_tokens: int):
        self.server, self.idle_n = server, idle
        self.chatters = [Chatter(server.url, max_new_tokens) for _ in range(streams)]
        self.idle: list = []
        self.tasks: list[asyncio.Task] = []
        self.rss: list[tuple[float, float]] = []
        self.started = time.monotonic()

    async def start(self) -> None:
        for _ in range(self.idle_n):
            self.idle.append(await websockets.connect(_ws_url(self.server.url, _token("idle"))))
        self.tasks = [asyncio.create_task(c.run()) for c in self.chatters]
        self.tasks.append(asyncio.create_task(self._sample()))

    async def _sample(self) -> None:
        while True:
            rss = self.server.rss_mb()
            if rss is not None:
                self.rss.append((time.monotonic() - self.started, rss))
            await asyncio.sleep(2)

    async def stop(self) -> dict:
        for c in self.chatters:
            c.stopping = True
        done, pending = await asyncio.wait(self.tasks[:-1], timeout=300)
        for task in [*pending, self.tasks[-1]]:
            task.cancel()
        idle_alive = 0
        for ws in self.idle:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(await ws.ping(), 10)
                idle_alive += 1
            with contextlib.suppress(Exception):
                await ws.close()
        finished: dict[str, int] = {}
        for c in self.chatters:
            for k, v in c.finished.items():
                finished[k] = finished.get(k, 0) + v
        rss = [mb for _, mb in self.rss]
        warm = rss[len(rss) // 4:] or rss  # after warm-up
        return {
            "idle_connections": self.idle_n, "idle_still_open": idle_alive, "streams": len(self.chatters),
            "minutes": round((time.monotonic() - self.started) / 60, 2), "answers": finished,
            "stream_errors": [e for c in self.chatters for e in c.errors],
            "rss_mb_after_warmup": round(warm[0], 1) if warm else None,
            "rss_mb_end": round(rss[-1], 1) if rss else None, "rss_mb_max": round(max(rss), 1) if rss else None,
        }


# -- 2. bad inputs ------------------------------------------------------------------------------


async def _ws_try(url: str, frame: str | dict, token: str | None = None) -> dict:
    """Send one frame on a fresh socket; what came back: refused (code), answered (finish), 5xx."""
    async with websockets.connect(_ws_url(url, token or _token("bad")), max_size=None) as ws:
        if not isinstance(frame, str):
            await ws.send(json.dumps(frame))
        else:
            await ws.send(frame)
        first = await _next_of(ws, {"error", "started", "ack"}, timeout=120)
        if first["type"] == "error":
            return {"outcome": "server_error" if first["code"] in SERVER_CODES else "refused", "code": first["code"]}
        if first["type"] == "ack":
            return {"outcome": "accepted"}
        reason, _ = await _read_answer_from_started(ws)
        return {"outcome": "server_error" if reason == "error" else "answered", "finish_reason": reason}


async def _read_answer_from_started(ws) -> tuple[str, None]:
    while True:
        frame = json.loads(await asyncio.wait_for(ws.recv(), 300))
        if frame["type"] == "error" and frame["code"] in SERVER_CODES:
            return "error", None
        if frame["type"] == "done":
            return frame["finish_reason"], None


SERVER_CODES = {"internal_error", "engine_error", "server_error"}


async def _http_try(client: httpx.AsyncClient, method: str, path: str, token: str, *, body: str | None = None,
                    stream: bool = False) -> dict:
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    if stream:
        async with client.stream(method, path, content=body, headers=headers) as response:
            text = (await response.aread()).decode("utf-8", "replace")
    else:
        response = await client.request(method, path, content=body, headers=headers)
        text = response.text
    status = response.status_code
    if status >= 500:
        return {"outcome": "server_error", "status": status, "body": text[:200]}
    if status >= 400:
        return {"outcome": "refused", "status": status}
    if stream and '"error"' in text:
        return {"outcome": "server_error" if "engine_error" in text or "internal" in text else "refused",
                "status": status, "body": text[-200:]}
    return {"outcome": "answered" if "/chat/completions" in path else "accepted", "status": status}


async def bad_inputs(server: Server, load: Load) -> dict:
    url = server.url
    victim = _token("victim")
    async with websockets.connect(_ws_url(url, victim), max_size=None) as ws:
        await ws.send(json.dumps({"type": "message", "content": "hello", "params": {"max_new_tokens": 8}}))
        started = await _next_of(ws, {"started"})
        await _read_answer_from_started(ws)
    message_id, conversation_id = started["message_id"], started["conversation_id"]
    before = {k: v for c in load.chatters for k, v in c.finished.items() if k == "error"}

    def chat_body(**fields) -> str:
        return json.dumps({"messages": [{"role": "user", "content": "hi"}], "max_tokens": 8, **fields})

    nul, surrogate = "a\u0000b", '"a\\ud800b"'
    cases: list[tuple[str, str, object]] = []  # (name, expectation, coroutine factory)
    for value in (1e-300, 5e-324, 1e-40):
        for name in ("temperature", "top_p"):
            cases.append((f"ws params.{name}={value:g}", "poison",
                          lambda n=name, v=value: _ws_try(url, {"type": "message", "content": "x",
                                                               "params": {n: v, "max_new_tokens": 8}})))
    async with httpx.AsyncClient(base_url=url, timeout=300) as client:
        tok = _token("bad-http")
        for stream in (False, True):
            cases.append((f"http temperature=1e-300 stream={stream}", "poison",
                          lambda s=stream: _http_try(client, "POST", "/v1/chat/completions", tok,
                                                     body=chat_body(temperature=1e-300, stream=s), stream=s)))
            cases.append((f"http NUL content stream={stream}", "refuse",
                          lambda s=stream: _http_try(client, "POST", "/v1/chat/completions", tok, body=json.dumps(
                              {"messages": [{"role": "user", "content": nul}], "stream": s, "max_tokens": 8}), stream=s)))
            cases.append((f"http lone surrogate content stream={stream}", "refuse",
                          lambda s=stream: _http_try(client, "POST", "/v1/chat/completions", tok,
                                                     body='{"messages": [{"role": "user", "content": %s}], "stream": %s, '
                                                     '"max_tokens": 8}' % (surrogate, json.dumps(s)), stream=s)))
        cases += [
            ("ws NUL content", "refuse", lambda: _ws_try(url, {"type": "message", "content": nul})),
            ("ws lone surrogate content", "refuse",
             lambda: _ws_try(url, '{"type": "message", "content": %s}' % surrogate)),
            ("http lone surrogate feedback reason", "refuse",
             lambda: _http_try(client, "POST", f"/api/messages/{message_id}/feedback", victim,
                               body='{"rating": 1, "reason": %s}' % surrogate)),
            ("ws lone surrogate feedback reason", "refuse",
             lambda: _ws_try(url, '{"type": "feedback", "message_id": "%s", "rating": 1, "reason": %s}'
                             % (message_id, surrogate), token=victim)),
            ("http NUL feedback reason", "refuse",
             lambda: _http_try(client, "POST", f"/api/messages/{message_id}/feedback", victim,
                               body=json.dumps({"rating": 1, "reason": nul}))),
            ("http NUL title", "refuse",
             lambda: _http_try(client, "PATCH", f"/api/conversations/{conversation_id}", victim,
                               body=json.dumps({"title": nul}))),
            ("ws deep JSON (100 KB of brackets)", "refuse", lambda: _ws_try(url, DEEP_JSON)),
            ("http deep JSON (100 KB of brackets)", "refuse",
             lambda: _http_try(client, "POST", "/v1/chat/completions", tok, body=DEEP_JSON)),
            ('ws max_new_tokens "4"', "refuse",
             lambda: _ws_try(url, {"type": "message", "content": "x", "params": {"max_new_tokens": "4"}})),
            ("ws max_new_tokens true", "refuse",
             lambda: _ws_try(url, {"type": "message", "content": "x", "params": {"max_new_tokens": True}})),
            ("ws rating true", "refuse",
             lambda: _ws_try(url, {"type": "feedback", "message_id": message_id, "rating": True}, token=victim)),
            ("ws rating 1.0", "refuse",
             lambda: _ws_try(url, {"type": "feedback", "message_id": message_id, "rating": 1.0}, token=victim)),
        ]
        results = {}
        for name, expect, attempt in cases:
            try:
                got = await attempt()
            except Exception as exc:  # noqa: BLE001 - a closed connection is an outcome
                got = {"outcome": "connection_failed", "detail": f"{type(exc).__name__}: {exc}"}
            good = got["outcome"] == "refused" or (expect == "poison" and got["outcome"] == "answered")
            results[name] = {**got, "ok": good}
    after = {k: v for c in load.chatters for k, v in c.finished.items() if k == "error"}
    five_xx = sum(1 for r in results.values() if r["outcome"] in ("server_error", "connection_failed"))
    return {
        "tried": len(results), "ok": sum(r["ok"] for r in results.values()), "server_errors": five_xx,
        "accepted_wrongly": [n for n, r in results.items() if r["outcome"] == "accepted"
                             or (r["outcome"] == "answered" and not n.startswith(("ws params", "http temperature")))],
        "bystander_answers_failed": after.get("error", 0) - before.get("error", 0),
        "cases": results,
    }


# -- 3. cross-user ------------------------------------------------------------------------------


async def cross_user(server: Server) -> dict:
    url = server.url
    owner, attacker = _token("owner"), _token("attacker")
    async with websockets.connect(_ws_url(url, owner), max_size=None) as ws:
        ids = []
        for _ in range(2):
            await ws.send(json.dumps({"type": "regenerate", "message_id": ids[0]}) if ids else
                          json.dumps({"type": "message", "content": "mine", "params": {"max_new_tokens": 8}}))
            started = await _next_of(ws, {"started"})
            await _read_answer_from_started(ws)
            ids.append(started["message_id"])
    answer, other = ids
    conversation = started["conversation_id"]
    attempts = {}
    async with httpx.AsyncClient(base_url=url, timeout=120,
                                 headers={"Authorization": f"Bearer {attacker}"}) as client:
        http = [
            ("GET conversation", "GET", f"/api/conversations/{conversation}", None),
            ("PATCH conversation", "PATCH", f"/api/conversations/{conversation}", {"title": "mine now"}),
            ("PATCH allow_data_use", "PATCH", f"/api/conversations/{conversation}", {"allow_data_use": False}),
            ("POST feedback", "POST", f"/api/messages/{answer}/feedback", {"rating": -1}),
            ("POST compare", "POST", f"/api/messages/{answer}/compare", {"other_id": other, "verdict": "worse"}),
        ]
        for name, method, path, body in http:
            response = await client.request(method, path, json=body)
            attempts[f"http {name}"] = response.status_code < 400
        listed = (await client.get("/api/conversations")).json()
        attempts["http list shows it"] = any(c["id"] == conversation for c in listed)
    frames = [
        ("ws message in conversation", {"type": "message", "conversation_id": conversation, "content": "x"}),
        ("ws message under parent", {"type": "message", "conversation_id": conversation, "parent_id": answer,
                                     "content": "x"}),
        ("ws regenerate", {"type": "regenerate", "message_id": answer}),
        ("ws feedback", {"type": "feedback", "message_id": answer, "rating": -1}),
        ("ws compare", {"type": "compare", "message_id": answer, "other_id": other, "verdict": "worse"}),
    ]
    for name, frame in frames:
        got = await _ws_try(url, frame, token=attacker)
        attempts[name] = got["outcome"] in ("accepted", "answered")
    return {"attempts": len(attempts), "succeeded": sum(attempts.values()),
            "which_succeeded": [n for n, ok in attempts.items() if ok]}


# -- 4. the database stopped and started again --------------------------------------------------


async def database_outage(server: Server, pg: OwnedPostgres, down_s: float) -> dict:
    token = _token("outage")
    statuses: dict[str, int] = {}
    async with httpx.AsyncClient(base_url=server.url, timeout=60,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        await client.get("/api/conversations")
        await asyncio.to_thread(pg.stop)
        stopped = time.monotonic()
        slowest = 0.0
        while time.monotonic() - stopped < down_s:
            t = time.monotonic()
            response = await client.get("/api/conversations")
            slowest = max(slowest, time.monotonic() - t)
            key = f"{response.status_code} {response.json().get('code', '') if response.status_code >= 400 else ''}"
            statuses[key.strip()] = statuses.get(key.strip(), 0) + 1
            await asyncio.sleep(0.2)
        await asyncio.to_thread(pg.start)
        back = time.monotonic()
        while (await client.get("/api/conversations")).status_code != 200:
            if time.monotonic() - back > 120:
                break
            await asyncio.sleep(0.1)
        recovered_s = time.monotonic() - back
        after = [(await client.get("/api/conversations")).status_code for _ in range(25)]
    return {"down_s": down_s, "while_down": statuses, "slowest_answer_while_down_s": round(slowest, 2),
            "recovered_after_s": round(recovered_s, 2), "failed_of_25_after": sum(s != 200 for s in after)}


# -- 5. kill -9 ---------------------------------------------------------------------------------


async def kill_9(server: Server, database_url: str, voters: int = 4, acks_before_kill: int = 150) -> dict:
    acked: list[tuple[int, str]] = []

    async def vote(ws, message_id: str) -> None:
        n = 0
        while True:
            reason = f"vote {secrets.token_hex(4)}-{n}"
            await ws.send(json.dumps({"type": "feedback", "message_id": message_id, "rating": 1 - 2 * (n % 2),
                                      "reason": reason}))
            acked.append(((await _next_of(ws, {"ack"}))["id"], reason))
            n += 1

    async with contextlib.AsyncExitStack() as stack:
        tasks = []
        for _ in range(voters):
            ws = await stack.enter_async_context(websockets.connect(_ws_url(server.url, _token("voter"))))
            await ws.send(json.dumps({"type": "message", "content": "rate me", "params": {"max_new_tokens": 8}}))
            started = await _next_of(ws, {"started"})
            await _read_answer_from_started(ws)
            tasks.append(asyncio.create_task(vote(ws, started["message_id"])))
        while len(acked) < acks_before_kill and not any(t.done() for t in tasks):
            await asyncio.sleep(0.02)
        server.process.send_signal(signal.SIGKILL)
        await asyncio.gather(*tasks, return_exceptions=True)
    server.process.wait()
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cur = await db.execute("SELECT rating_id, reason FROM rating_changes WHERE reason = ANY(%s)",
                               ([r for _, r in acked],))
        present = {tuple(row) for row in await cur.fetchall()}
    restart_s = await server.start()
    return {"acked": len(acked), "lost": len(set(acked) - present), "restart_s": round(restart_s, 1)}


# -- 6. SIGTERM mid-stream ----------------------------------------------------------------------


async def sigterm(server: Server, database_url: str, streams: int, max_new_tokens: int) -> dict:
    token = _token("sigterm")
    received: dict[str, dict] = {}

    async def ws_stream(i: int) -> None:
        async with websockets.connect(_ws_url(server.url, token), max_size=None) as ws:
            await ws.send(json.dumps({"type": "message", "content": PROMPTS[i % len(PROMPTS)],
                                      "params": {"max_new_tokens": max_new_tokens}}))
            text: list[str] = []
            record = {"kind": "ws", "final": None, "text": ""}
            with contextlib.suppress(websockets.ConnectionClosed):
                while True:
                    frame = json.loads(await ws.recv())
                    if frame["type"] == "started":
                        received[frame["message_id"]] = record
                    elif frame["type"] == "token":
                        text.append(frame["text"])
                        record["text"] = "".join(text)
                    elif frame["type"] == "done":
                        record["final"] = frame["finish_reason"]
            record["close"] = [ws.close_code, ws.close_reason]

    async def sse_stream(i: int, client: httpx.AsyncClient) -> None:
        body = {"messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}], "stream": True,
                "max_tokens": max_new_tokens}
        record = {"kind": "sse", "final": None, "text": "", "done_marker": False}
        async with client.stream("POST", "/v1/chat/completions", json=body) as response:
            async for line in response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    record["done_marker"] = True
                    continue
                chunk = json.loads(data)
                if "error" in chunk:
                    record["final"] = f"error:{chunk['error']['code']}"
                    continue
                received[chunk["id"]] = record
                choice = chunk["choices"][0] if chunk.get("choices") else None
                if choice:
                    record["text"] += choice["delta"].get("content", "")
                    if choice["finish_reason"]:
                        record["final"] = choice["finish_reason"]

    async with httpx.AsyncClient(base_url=server.url, timeout=300,
                                 headers={"Authorization": f"Bearer {token}"}) as client:
        tasks = [asyncio.create_task(ws_stream(i)) for i in range(streams)]
        tasks += [asyncio.create_task(sse_stream(i, client)) for i in range(streams)]
        while sum(bool(r["text"]) for r in received.values()) < 2 * streams:
            if all(t.done() for t in tasks):
                break
            await asyncio.sleep(0.05)
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*tasks, return_exceptions=True)
        code = await asyncio.to_thread(server.process.wait, 300)
        exit_s = time.monotonic() - signalled
    async with await psycopg.AsyncConnection.connect(database_url) as db:
        cur = await db.execute("SELECT id::text, content FROM messages WHERE id::text = ANY(%s)", (list(received),))
        stored = dict(await cur.fetchall())
    log_text = server.log.read_text()
    finals = [r["final"] for r in received.values()]
    return {
        "streams": len(received), "final_frames": sum(f is not None for f in finals),
        "finish_reasons": {f: finals.count(f) for f in set(map(str, finals))},
        "sse_done_markers": sum(r.get("done_marker", False) for r in received.values() if r["kind"] == "sse"),
        "ws_close": sorted({tuple(r.get("close") or ()) for r in received.values() if r["kind"] == "ws"}),
        "stored_equals_received": sum(stored.get(mid) == r["text"] for mid, r in received.items()),
        "exit_code": code, "exit_s": round(exit_s, 1), "tracebacks_in_log": log_text.count("Traceback"),
    }


# -- the run ------------------------------------------------------------------------------------


async def run(args) -> Report:
    from deploy.base_model import resolve_base_model

    model_dir = Path(await asyncio.to_thread(resolve_base_model, args.model, Path(args.data_dir)))
    report = Report(started_at=datetime.now(UTC).isoformat(timespec="seconds"), model=str(model_dir),
                    settings={k: v for k, v in vars(args).items() if k != "out"},
                    machine={"cpus": os.cpu_count(), "load_average": os.getloadavg(),
                             "platform": platform.platform(), "python": platform.python_version()})
    workdir = Path(args.workdir or __import__("tempfile").mkdtemp(prefix="bench-faults-"))
    workdir.mkdir(parents=True, exist_ok=True)
    log.info("work directory %s (server logs)", workdir)
    pg = await asyncio.to_thread(OwnedPostgres)
    try:
        from feedback.migrate import migrate

        await asyncio.to_thread(migrate, pg.url)
        server = Server(args, pg.url, model_dir, workdir)
        log.info("server ready in %.1f s", await server.start())
        load = Load(server, args.idle, args.streams, args.max_new_tokens)
        await load.start()
        until = time.monotonic() + args.minutes * 60
        log.info("load: %d idle websockets, %d streams for %g min", args.idle, args.streams, args.minutes)
        report.bad_inputs = await bad_inputs(server, load)
        log.info("bad inputs: %d tried, %d 5xx", report.bad_inputs["tried"], report.bad_inputs["server_errors"])
        report.cross_user = await cross_user(server)
        log.info("cross-user: %d tried, %d succeeded", report.cross_user["attempts"], report.cross_user["succeeded"])
        await asyncio.sleep(max(0.0, until - time.monotonic()))
        report.load = await load.stop()
        log.info("load held: %s", report.load)

        outage_load = Load(server, 0, args.streams, args.max_new_tokens)
        await outage_load.start()
        report.database_outage = await database_outage(server, pg, args.db_down_s)
        report.database_outage["streams_during"] = await outage_load.stop()
        log.info("database outage: %s", report.database_outage)
        report.kill_9 = await kill_9(server, pg.url)
        log.info("kill -9: %s", report.kill_9)
        report.sigterm = await sigterm(server, pg.url, max(1, args.streams // 2), args.sigterm_tokens)
        log.info("SIGTERM: %s", report.sigterm)
        server.kill()
    finally:
        await asyncio.to_thread(pg.close)
    report.failures = _failures(report)
    return report


def _failures(r: Report) -> list[str]:
    f = []
    if r.bad_inputs.get("server_errors"):
        f.append(f"{r.bad_inputs['server_errors']} bad inputs got a 5xx / server error")
    if r.bad_inputs.get("bystander_answers_failed"):
        f.append(f"{r.bad_inputs['bystander_answers_failed']} bystander answers failed during bad inputs")
    if r.bad_inputs.get("accepted_wrongly"):
        f.append(f"accepted what should be refused: {r.bad_inputs['accepted_wrongly']}")
    if r.cross_user.get("succeeded"):
        f.append(f"cross-user attempts that succeeded: {r.cross_user['which_succeeded']}")
    if r.load.get("stream_errors") or r.load.get("idle_still_open") != r.load.get("idle_connections"):
        f.append("the load lost connections")
    if r.kill_9.get("lost"):
        f.append(f"{r.kill_9['lost']} acked thumbs lost across kill -9")
    o = r.database_outage
    if o.get("failed_of_25_after") or o.get("recovered_after_s", 1e9) > 10:
        f.append("the service did not come back promptly after the database returned")
    if set(o.get("while_down", {})) - {"503 database_unavailable"}:
        f.append(f"answers while the database was down other than 503: {o['while_down']}")
    s = r.sigterm
    if s.get("exit_code") != 0 or s.get("tracebacks_in_log") or s.get("final_frames") != s.get("streams") \
            or s.get("stored_equals_received") != s.get("streams"):
        f.append(f"SIGTERM did not drain cleanly: {s}")
    return f


def print_report(r: Report) -> None:
    load, bad, cross, o, k, s = r.load, r.bad_inputs, r.cross_user, r.database_outage, r.kill_9, r.sigterm
    print(f"\nfaults benchmark on {r.model}")
    print(f"  bad inputs tried: {bad['tried']}, answered with a 5xx: {bad['server_errors']}, "
          f"refused or answered as they should: {bad['ok']}, bystander answers failed: "
          f"{bad['bystander_answers_failed']}")
    for name, case in bad["cases"].items():
        if not case["ok"]:
            print(f"    not ok: {name}: {case}")
    print(f"  load held: {load['idle_connections']} idle websockets (+{load['streams']} streaming) for "
          f"{load['minutes']} min, {sum(load['answers'].values())} answers {load['answers']}, "
          f"{len(load['stream_errors'])} stream errors, idle still open {load['idle_still_open']}, "
          f"RSS {load['rss_mb_after_warmup']} -> {load['rss_mb_end']} MB (max {load['rss_mb_max']})")
    print(f"  database down {o['down_s']:g} s: {o['while_down']} (slowest {o['slowest_answer_while_down_s']} s); "
          f"back {o['recovered_after_s']} s after it returned; {o['failed_of_25_after']} of 25 failed after")
    print(f"  kill -9: {k['acked']} acked thumbs, {k['lost']} lost; restarted in {k['restart_s']} s")
    print(f"  SIGTERM: {s['streams']} streams, {s['final_frames']} final frames {s['finish_reasons']}, "
          f"stored == received for {s['stored_equals_received']}, exit {s['exit_code']} in {s['exit_s']} s, "
          f"{s['tracebacks_in_log']} tracebacks")
    print(f"  cross-user attempts: {cross['attempts']}, succeeded: {cross['succeeded']}")
    for failure in r.failures:
        print(f"  FAILED: {failure}")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=os.environ.get("MODEL"), help="model directory (default: converted SmolLM2)")
    parser.add_argument("--data-dir", default=os.environ.get("DATA_DIR", "var"))
    parser.add_argument("--minutes", type=float, default=3.0, help="how long the load is held")
    parser.add_argument("--idle", type=int, default=100, help="idle websockets held open")
    parser.add_argument("--streams", type=int, default=4, help="users chatting back to back")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--sigterm-tokens", type=int, default=256, help="answer length of the SIGTERMed streams")
    parser.add_argument("--shutdown-timeout", type=float, default=5.0, help="the server's SHUTDOWN_TIMEOUT")
    parser.add_argument("--db-down-s", type=float, default=10.0, help="how long the database is stopped")
    parser.add_argument("--engine-threads", type=int, default=None)
    parser.add_argument("--start-timeout-s", type=float, default=300.0)
    parser.add_argument("--workdir", default=None, help="where server logs go (default: a temp dir)")
    parser.add_argument("--out", default=str(ROOT / "bench" / "results" / "faults.json"))
    return parser.parse_args(argv)


def main(argv=None) -> None:
    from feedback.logs import configure_logging

    configure_logging()
    args = parse_args(argv)
    report = run_until_terminated(run(args))
    print_report(report)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(asdict(report), indent=2, default=str))
    print(f"wrote {out}")
    if report.failures:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
