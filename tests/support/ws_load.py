"""A websocket load generator: `streams` clients of the chat protocol, each sending a new
message as soon as its previous answer is done, until stopped. The swap tests run it through a
hot swap (no stream may be dropped); bench/swap.py measures a swap under it.

Each client is a user of its own (a fresh token) and keeps one conversation-less connection:
every request starts a new conversation, so the version it runs on is the serving one at that
moment, never one kept by a conversation."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import websockets

WAIT_S = 60  # a loaded machine can be slow; a healthy swap takes well under a second here


@dataclass
class StreamRecord:
    """One request of the load: when it was sent, what ran it, how it ended (times are
    time.monotonic() in this process)."""

    stream: int
    sent_at: float
    started_at: float | None = None
    first_token_at: float | None = None
    done_at: float | None = None
    model_version: str | None = None
    message_id: str | None = None
    conversation_id: str | None = None
    text: str = ""
    finish_reason: str | None = None
    tokens: int = 0  # completion tokens, from the done frame's usage
    errors: list[dict] = field(default_factory=list)  # error frames ({"code", "message"})

    @property
    def failed(self) -> bool:
        return bool(self.errors) or self.finish_reason not in ("stop", "length")

    @property
    def error(self) -> str | None:
        return "; ".join(f"{e['code']}: {e['message']}" for e in self.errors) or None


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


class StreamLoad:
    """`streams` websocket clients sending requests back to back until `stop()`; every request
    ends up in `records`.

    Request n of stream i asks `prompts[(i + n) % len(prompts)]` with `params`. By default a
    dropped connection or a silent server fails the load (the exception comes out of `stop()`);
    with `keep_going` it is recorded as the request's error and the stream reconnects, which is
    what a benchmark wants from a long run."""

    def __init__(self, base_url: str, streams: int = 16, *, max_new_tokens: int = 48,
                 temperature: float | None = 0.0, prompts: Sequence[str] = ("Tell me about the sea.",),
                 token_prefix: str = "test", recv_timeout_s: float = 30, keep_going: bool = False):
        self.ws_url = base_url.replace("http://", "ws://") + "/ws"
        self.streams = streams
        self.params: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        if temperature is not None:
            self.params["temperature"] = temperature
        self.prompts = list(prompts)
        self.token_prefix = token_prefix
        self.recv_timeout_s = recv_timeout_s
        self.keep_going = keep_going
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

    def first_token_on(self, version: str, after: float) -> float | None:
        """When the first token of a request running on `version` arrived after `after`."""
        times = [r.first_token_at for r in self.records
                 if r.model_version == version and r.first_token_at is not None and r.first_token_at > after]
        return min(times, default=None)

    async def _stream(self, index: int) -> None:
        token = f"{self.token_prefix}-{uuid.uuid4().hex}"
        sent = 0
        while not self._stop.is_set():
            try:
                async with websockets.connect(f"{self.ws_url}?token={token}", max_size=None) as ws:
                    while not self._stop.is_set():
                        record = StreamRecord(stream=index, sent_at=time.monotonic())
                        self.records.append(record)
                        content = self.prompts[(index + sent) % len(self.prompts)]
                        sent += 1
                        await ws.send(json.dumps({"type": "message", "content": content, "params": self.params}))
                        await self._read_answer(ws, record)
            except Exception as exc:
                if not self.keep_going:
                    raise
                # A dropped connection fails the request it was on; the stream reconnects.
                failure = {"code": type(exc).__name__, "message": str(exc)}
                last = next((r for r in reversed(self.records) if r.stream == index), None)
                if last is not None and last.done_at is None:
                    last.errors.append(failure)
                else:
                    self.records.append(StreamRecord(stream=index, sent_at=time.monotonic(), errors=[failure]))
                await asyncio.sleep(0.1)

    async def _read_answer(self, ws, record: StreamRecord) -> None:
        pieces = []
        while True:
            frame = json.loads(await asyncio.wait_for(ws.recv(), self.recv_timeout_s))
            kind = frame["type"]
            if kind == "started":
                record.started_at = time.monotonic()
                record.model_version = frame["model_version"]
                record.message_id = frame["message_id"]
                record.conversation_id = frame["conversation_id"]
            elif kind == "token":
                if record.first_token_at is None:
                    record.first_token_at = time.monotonic()
                pieces.append(frame["text"])
            elif kind == "error":
                record.errors.append(frame)
                if record.started_at is None:  # refused before starting: nothing else comes
                    return
            elif kind == "done":
                record.done_at = time.monotonic()
                record.finish_reason = frame["finish_reason"]
                record.tokens = frame["usage"]["completion_tokens"]
                record.text = "".join(pieces)
                return


def assert_all_completed(records: list[StreamRecord]) -> None:
    """No request was refused or failed, and every one ran to its end."""
    failed = [r for r in records if r.failed]
    assert not failed, f"{len(failed)} of {len(records)} requests failed, e.g. {failed[:3]}"
