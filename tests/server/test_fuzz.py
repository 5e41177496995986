"""Fuzzing, against a real server on the tiny model and PostgreSQL: hypothesis-generated
websocket frames and HTTP bodies (NUL characters, lone surrogates, wrong types, unknown
fields, deep and odd JSON), and schemathesis over the whole of /openapi.json.

What must hold for every input: no 5xx; every refusal a typed error in the right shape
(OpenAI's under /v1, `{"code", "message"}` elsewhere, an error frame on the websocket) whose
code is never `internal_error`; the websocket stays usable; nothing half-written (no
conversation without a message, every announced answer stored, one user message per
accepted turn).

Hypothesis drives synchronous clients, so the server runs in a process of its own (its own
event loop and engine on the tiny model; see `live`). Example counts are small: the module runs in about
a minute on this project's 2-core CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psycopg
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg.rows import dict_row
from schemathesis.checks import not_a_server_error
from websockets.sync.client import connect as ws_connect

from server.errors import ServerError
from server_testkit import new_token, ws_url

FUZZ = settings(max_examples=30, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def _codes() -> set[str]:
    """Every error code the server and the store define (server/errors.py, feedback/errors.py)."""
    from feedback.errors import StoreError

    found, todo = set(), [ServerError, StoreError]
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        if isinstance(cls.__dict__.get("code"), str):
            found.add(cls.code)
    from server.errors import HttpRefusal

    return found | set(HttpRefusal.CODES.values())


CODES = _codes() - {"server_error", "store_error"}


# The server of this module, in a process of its own: hypothesis drives synchronous clients
# (so not the test loop's server), and it raises the recursion limit of the process it runs in
# (so not a thread either: deep JSON would parse there, where a real server fails).
SERVER_SCRIPT = """
import asyncio, sys
from server.engine.local import LocalEngineConfig, start_local_engine
from server_testkit import make_settings, serve

async def main(model_dir, db_url, data_dir):
    engine = await start_local_engine(
        model_dir, LocalEngineConfig(max_batch_size=8, context_length=1024, seed=0, threads=1))
    settings = make_settings(db_url, data_dir, default_max_new_tokens=4, max_frame_bytes=16 * 1024)
    async with serve(settings, engine) as url:
        print(url, flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)  # until closed
    await engine.close()

asyncio.run(main(*sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def live(db_url, tiny_model_dir, tmp_path_factory) -> Iterator[str]:
    """The app on a real uvicorn server in its own process, with its own engine."""
    data_dir = tmp_path_factory.mktemp("fuzz")
    here = Path(__file__).parent
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(here), str(here.parent), os.environ.get("PYTHONPATH", "")])}
    with open(data_dir / "server.log", "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-c", SERVER_SCRIPT, str(tiny_model_dir), db_url, str(data_dir)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True, env=env,
        )
        try:
            url = process.stdout.readline().strip()
            assert url.startswith("http://"), (data_dir / "server.log").read_text()[-3000:]
            yield url
        finally:
            process.stdin.close()
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def user_rows(db_url: str, token: str) -> dict:
    from feedback.store import hash_token

    with psycopg.connect(db_url, row_factory=dict_row) as conn:
        return conn.execute(
            """SELECT
                 (SELECT count(*) FROM conversations c JOIN users u ON u.id = c.user_id
                   WHERE u.token_hash = %(h)s AND NOT EXISTS
                     (SELECT 1 FROM messages m WHERE m.conversation_id = c.id)) AS empty_conversations,
                 (SELECT count(*) FROM messages m JOIN conversations c ON c.id = m.conversation_id
                   JOIN users u ON u.id = c.user_id WHERE u.token_hash = %(h)s AND m.role = 'user') AS user_messages,
                 (SELECT array_agg(m.id::text) FROM messages m JOIN conversations c ON c.id = m.conversation_id
                   JOIN users u ON u.id = c.user_id WHERE u.token_hash = %(h)s AND m.role = 'assistant') AS answers""",
            {"h": hash_token(token)},
        ).fetchone()


# -- strategies -----------------------------------------------------------------------------------

# Text with what PostgreSQL and tokenizers cannot hold mixed in: NUL, lone surrogates, controls.
nasty_text = st.one_of(
    st.text(max_size=20),
    st.text(st.characters(codec=None, categories=["Cs", "Cc", "L", "N", "P", "So"]), max_size=12),
    st.sampled_from(["\x00", "\ud800", "a\udfffb", "\ud83d", "😀", "", " ", "[[[[", '"}', "\\"]),
)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70),
                    st.floats(allow_nan=False, allow_infinity=False), nasty_text)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(nasty_text, inner, max_size=3), max_leaves=8)
ids = st.one_of(st.uuids().map(str), nasty_text, st.integers())
numbers = st.one_of(st.floats(allow_nan=False, allow_infinity=False), st.integers(-5, 5),
                    st.sampled_from([1e-300, 5e-324, 1e-40, 0, 1, True, "4", 4.0]), st.none())
params = st.one_of(st.fixed_dictionaries({}, optional={
    "temperature": numbers, "top_p": numbers,
    "max_new_tokens": st.one_of(st.integers(1, 4), numbers)}), json_values)

FRAME_FIELDS = {
    "conversation_id": st.one_of(st.none(), ids), "parent_id": st.one_of(st.none(), ids),
    "content": st.one_of(nasty_text, json_values), "params": params, "message_id": ids,
    "other_id": ids, "rating": st.one_of(st.sampled_from([1, -1, 1.0, True, 0, "1"]), json_values),
    "reason": st.one_of(st.none(), nasty_text), "verdict": st.one_of(
        st.sampled_from(["better", "worse", "same"]), nasty_text),
    "bogus": json_values,
}
def near_valid_frames(known_ids: list[str]) -> st.SearchStrategy[str]:
    """Frames of the right shape with one nasty part (text, a poisoned number, an id of the
    user's own or not): what reaches past validation into SQL, tokenization and the engine."""
    some_id = st.one_of(st.sampled_from(known_ids), st.uuids().map(str))
    small_params = st.fixed_dictionaries({"max_new_tokens": st.integers(1, 4)}, optional={
        "temperature": st.one_of(st.sampled_from([1e-300, 5e-324, 1e-40, 0, 0.7]), st.floats(0, 2)),
        "top_p": st.one_of(st.sampled_from([1e-300, 1e-40, 1.0]), st.floats(1e-9, 1))})
    return st.one_of(
        st.fixed_dictionaries({"type": st.just("message"), "content": nasty_text.filter(bool),
                               "params": small_params}),
        st.fixed_dictionaries({"type": st.just("regenerate"), "message_id": some_id, "params": small_params}),
        st.fixed_dictionaries({"type": st.just("feedback"), "message_id": some_id,
                               "rating": st.sampled_from([1, -1])}, optional={"reason": nasty_text}),
        st.fixed_dictionaries({"type": st.just("compare"), "message_id": some_id, "other_id": some_id,
                               "verdict": st.sampled_from(["better", "worse", "same"])}),
    ).map(json.dumps)


frames = st.one_of(
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "regenerate", "feedback", "compare", "cancel", "shout"])},
        optional=FRAME_FIELDS,
    ).map(json.dumps),
    json_values.map(json.dumps),
    nasty_text.map(lambda t: t.encode("utf-8", "replace").decode("utf-8")),  # not JSON at all
    st.integers(1000, 6000).map(lambda n: "[" * n + "]" * n),
    st.integers(1000, 6000).map(lambda n: '{"type": "message", "content": "x", "params": ' + "[" * n + "}"),
)


# -- the websocket ----------------------------------------------------------------------------------


def test_fuzzed_frames(live, db_url):
    token = new_token()
    announced: list[str] = []
    turns = 0

    with ws_connect(ws_url(live, token), max_size=None) as ws:

        def reply() -> dict:
            return json.loads(ws.recv(timeout=30))

        # One turn of the user's own first, so frames can name real ids.
        ws.send(json.dumps({"type": "message", "content": "hello", "params": {"max_new_tokens": 2}}))
        started = reply()
        while reply()["type"] != "done":
            pass
        announced.append(started["message_id"])
        turns += 1
        known = [started["message_id"], started["parent_id"]]

        @FUZZ
        @given(frame=st.one_of(frames, near_valid_frames(known)))
        def one_frame(frame: str):
            nonlocal turns
            ws.send(frame)
            sent = _loads(frame)
            if not _is_valid_cancel(sent):  # a valid cancel is answered by nothing
                first = reply()
                if first["type"] == "started":
                    announced.append(first["message_id"])
                    turns += sent.get("type") == "message"
                    while (frame_ := reply())["type"] != "done":
                        assert frame_["type"] in ("token", "error"), frame_
                    assert frame_["finish_reason"] in ("stop", "length"), frame_
                elif first["type"] == "error":
                    assert first["code"] in CODES and first["code"] != "internal_error", first
                    assert set(first) == {"type", "code", "message"} and first["message"]
                else:
                    assert first["type"] == "ack", first
            # The connection stays usable: a known-bad frame gets its error frame.
            ws.send('{"type": "nope"}')
            assert reply()["code"] == "unknown_type"

        one_frame()

    found = user_rows(db_url, token)
    assert found["empty_conversations"] == 0
    assert set(announced) <= set(found["answers"] or [])
    assert found["user_messages"] == turns


def _loads(text: str):
    try:
        return json.loads(text)
    except (ValueError, RecursionError):  # not JSON, or too deep for this process's parser
        return None


def _is_valid_cancel(frame) -> bool:
    if not isinstance(frame, dict) or frame.get("type") != "cancel" or not set(frame) <= {"type", "message_id"}:
        return False
    target = frame.get("message_id")
    if target is None:
        return True
    try:
        return isinstance(target, str) and uuid.UUID(target) is not None
    except ValueError:
        return False


# -- HTTP bodies ------------------------------------------------------------------------------------

message = st.fixed_dictionaries({"role": st.sampled_from(["user", "system", "assistant", "developer", "tool"])},
                                optional={"content": st.one_of(nasty_text, json_values,
                                                               st.lists(st.fixed_dictionaries(
                                                                   {"type": st.just("text"), "text": nasty_text}),
                                                                   max_size=2))})
user_turn = st.fixed_dictionaries({"role": st.just("user"), "content": nasty_text.filter(bool)})
near_valid_bodies = st.fixed_dictionaries(
    {"messages": st.lists(st.fixed_dictionaries({
        "role": st.sampled_from(["system", "user", "assistant"]),
        "content": st.one_of(nasty_text.filter(bool), st.lists(st.fixed_dictionaries(
            {"type": st.just("text"), "text": nasty_text}), min_size=1, max_size=2))}), max_size=2)
        .flatmap(lambda head: user_turn.map(lambda last: [*head, last])),
     "max_tokens": st.integers(1, 3)},
    optional={"stream": st.booleans(), "temperature": st.sampled_from([1e-300, 5e-324, 0, 0.5]),
              "top_p": st.sampled_from([1e-300, 1e-40, 0.9])},
)
completion_bodies = st.one_of(
    near_valid_bodies,
    st.fixed_dictionaries({"messages": st.lists(message, max_size=3)}, optional={
        "model": st.one_of(st.just("default"), nasty_text), "stream": st.one_of(st.booleans(), scalars),
        "temperature": numbers, "top_p": numbers, "max_tokens": st.one_of(st.integers(1, 3), numbers),
        "n": st.one_of(st.just(1), scalars), "stream_options": json_values, "extra": json_values}),
    json_values,
)


def _check_http(response: httpx.Response, openai: bool) -> None:
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        body = response.json()
        error = body["error"] if openai else body
        assert error["code"] in CODES and error["code"] != "internal_error", body
        assert error["message"]


def test_fuzzed_completion_bodies(live, db_url):
    token = new_token()
    with httpx.Client(base_url=live, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:

        @FUZZ
        @given(body=completion_bodies)
        def one_body(body):
            response = client.post("/v1/chat/completions", content=json.dumps(body).encode(),
                                   headers={"Content-Type": "application/json"})
            _check_http(response, openai=True)
            if response.status_code == 200 and "text/event-stream" in response.headers["content-type"]:
                assert response.text.rstrip().endswith("data: [DONE]")

        one_body()
    assert user_rows(db_url, token)["empty_conversations"] == 0


def test_fuzzed_rest_bodies(live, db_url):
    token = new_token()
    with httpx.Client(base_url=live, headers={"Authorization": f"Bearer {token}"}, timeout=60) as client:
        reply = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]})
        answer = reply.json()["id"]
        conversation = str(client.get("/api/conversations").json()[0]["id"])
        paths = st.sampled_from([("POST", f"/api/messages/{answer}/feedback"),
                                 ("POST", f"/api/messages/{answer}/compare"),
                                 ("PATCH", f"/api/conversations/{conversation}"),
                                 ("POST", f"/api/messages/{uuid.uuid4()}/feedback")])
        bodies = st.one_of(json_values, st.fixed_dictionaries({"rating": st.sampled_from([1, -1])}, optional={
            "reason": nasty_text}), st.fixed_dictionaries({"title": nasty_text}), st.fixed_dictionaries({}, optional={
            "rating": FRAME_FIELDS["rating"], "reason": FRAME_FIELDS["reason"], "title": nasty_text,
            "allow_data_use": scalars, "other_id": ids, "verdict": FRAME_FIELDS["verdict"]}))

        @FUZZ
        @given(target=paths, body=bodies)
        def one_body(target, body):
            method, path = target
            response = client.request(method, path, content=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
            _check_http(response, openai=False)

        one_body()
        tree = client.get(f"/api/conversations/{conversation}").json()
    assert [m["role"] for m in tree["messages"]] == ["user", "assistant"]  # nothing added or lost


# -- schemathesis over /openapi.json -----------------------------------------------------------------


def test_openapi_schema(live):
    """Every operation of /openapi.json with schemathesis-generated inputs (valid and not):
    never a 5xx, every 4xx in our error shape. (Driven by hand rather than through
    schemathesis's pytest plugin, whose lazy fixture loading does not run on this pytest.)"""
    schema = schemathesis.openapi.from_url(f"{live}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 8, [op.label for op in operations]
    token = new_token()
    for operation in operations:

        @settings(max_examples=8, deadline=None, derandomize=True,
                  suppress_health_check=list(HealthCheck))
        @given(case=operation.as_strategy())
        def one_case(case):
            case.headers = {**(case.headers or {}), "Authorization": f"Bearer {token}"}
            response = case.call(base_url=live, timeout=60)
            case.validate_response(response, checks=[not_a_server_error])
            if response.status_code >= 400:
                body = response.json()  # every refusal is JSON
                error = body["error"] if case.path.startswith("/v1/") else body
                assert error["code"] in CODES and error["code"] != "internal_error", body

        one_case()
