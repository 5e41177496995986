"""The websocket `/ws`: JSON text frames as in DESIGN.md's contract.

Each client frame is answered in order: a `message` or `regenerate` by `started` (then `token`
frames and exactly one `done`, streamed by a task of its own so the connection keeps reading),
a `feedback` or `compare` by `ack` once committed, an `edit` of an answer by `ack` with the
new message's id, an `edit` of one's own question like a `message` (its new branch is
answered), any bad frame by `error`. A bad frame never
closes the connection. `cancel` stops the connection's running answers (or the one named by
`message_id`); each then ends with `done` and finish_reason "cancelled", its partial text
stored; a cancel with nothing running is ignored (it raced the end of the answer).

When the socket closes, running answers are cancelled and stored the same way. While the
database is unavailable, frames that need it get `database_unavailable` (a handshake: that
frame, then close code 1013); on SIGTERM the socket's answers finish (server/shutdown.py) and
it is closed with 1012, reason "shutting_down".
Frames larger than MAX_FRAME_BYTES get a `frame_too_large` error; frames beyond the transport's
hard cap (uvicorn's ws_max_size, 4x that) close the connection with code 1009. Frames nested
deeper than MAX_JSON_DEPTH get `bad_json` before they are parsed. A user holds at most
MAX_CONNECTIONS_PER_USER sockets at once: one more is accepted, told `too_many_connections` in
an error frame and closed with code 1008, as a refused identity is.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Annotated
from uuid import UUID

import psycopg
from fastapi import APIRouter, Depends, WebSocket
from pydantic import BaseModel
from starlette.websockets import WebSocketDisconnect, WebSocketState

from feedback.errors import StoreError

from . import wire
from .auth import TOKEN_HEADER, authenticate, token_from
from .chat import Answer, Chat
from .errors import (
    BadFrame,
    BadJson,
    DatabaseUnavailable,
    FrameTooLarge,
    ServerError,
    ShuttingDown,
    TooManyConnections,
    to_wire,
)
from .json_depth import too_deep
from .rest import get_chat
from .shutdown import CLOSE_REASON, SERVICE_RESTART

log = logging.getLogger(__name__)
router = APIRouter()

POLICY_VIOLATION = 1008  # websocket close code for a refused identity
TRY_AGAIN_LATER = 1013  # close code when the handshake could not reach the database
# How a refused handshake is closed, by error code (any other refusal: POLICY_VIOLATION).
HANDSHAKE_CLOSE_CODES = {ShuttingDown.code: SERVICE_RESTART, DatabaseUnavailable.code: TRY_AGAIN_LATER}
CLOSE_TIMEOUT_S = 10  # how long a closed socket's answers get to end and be stored


class Session:
    """One websocket connection of one user."""

    def __init__(self, websocket: WebSocket, user, chat: Chat):
        self.websocket = websocket
        self.user = user
        self.chat = chat
        self.running: dict[UUID, tuple[Answer, asyncio.Task]] = {}
        self._send_lock = asyncio.Lock()

    async def send(self, frame: BaseModel) -> None:
        # Answers stream from several tasks; one frame at a time on the socket.
        async with self._send_lock:
            await self.websocket.send_text(frame.model_dump_json())

    async def send_error(self, exc: BaseException) -> None:
        _, frame = to_wire(exc)
        if self.chat.metrics:
            self.chat.metrics.refusals.labels(frame.code).inc()
        await self.send(frame)

    async def handle(self, text: str) -> None:
        """Answer one client frame; every refusal becomes an error frame (to_wire logs the
        unexpected ones). Only a failure to send reaches the caller: the socket is gone."""
        try:
            await self._dispatch(self._parse(text))
        except (WebSocketDisconnect, OSError):
            raise
        except Exception as exc:
            await self.send_error(exc)

    def _parse(self, text: str):
        size = len(text.encode("utf-8"))
        limit = self.chat.settings.max_frame_bytes
        if size > limit:
            raise FrameTooLarge(size, limit)
        if too_deep(text, self.chat.settings.max_json_depth):
            raise BadJson.too_deep(self.chat.settings.max_json_depth)
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BadJson.undecodable(f"{exc.msg} at line {exc.lineno} column {exc.colno}") from None
        if not isinstance(data, dict):
            raise BadFrame(
                f"a frame must be a JSON object with a 'type', not a {type(data).__name__}"
            )
        return wire.client_frame.validate_python(data)

    async def _dispatch(self, frame) -> None:
        user = self.user
        match frame:
            case wire.MessageFrame():
                answer = await self.chat.start_message(
                    user, frame.conversation_id, frame.parent_id, frame.content, frame.params
                )
                await self._start(answer)
            case wire.RegenerateFrame():
                answer = await self.chat.start_regenerate(user, frame.message_id, frame.params)
                await self._start(answer)
            case wire.FeedbackFrame():
                rating_id = await self.chat.feedback(user, frame.message_id, frame.rating, frame.reason)
                await self.send(wire.AckFrame(of="feedback", id=rating_id))
            case wire.CompareFrame():
                comparison_id = await self.chat.compare(
                    user, frame.message_id, frame.other_id, frame.verdict
                )
                await self.send(wire.AckFrame(of="compare", id=comparison_id))
            case wire.EditFrame():
                edited = await self.chat.edit(user, frame.message_id, frame.content, frame.params)
                if isinstance(edited, Answer):  # an edited question: its branch is answered
                    await self._start(edited)
                else:
                    await self.send(wire.AckFrame(of="edit", id=str(edited.message.id)))
            case wire.CancelFrame():
                # The engine ends a cancelled request with a final event, so the answer's task
                # stores it and sends `done` like any other ending.
                for message_id, (answer, _) in list(self.running.items()):
                    if frame.message_id is None or frame.message_id == message_id:
                        answer.request.cancel()

    async def _start(self, answer: Answer) -> None:
        try:
            await self.send(
                wire.StartedFrame(
                    conversation_id=answer.conversation_id,
                    message_id=answer.message_id,
                    parent_id=answer.parent_id,
                    model_version=answer.model_version,
                )
            )
        except BaseException:
            answer.abandon()  # never streamed: stop the engine, free the slot
            raise
        task = asyncio.create_task(self._stream(answer), name=f"answer-{answer.message_id}")
        self.running[answer.message_id] = (answer, task)
        task.add_done_callback(lambda _: self.running.pop(answer.message_id, None))

    async def _stream(self, answer: Answer) -> None:
        stream = answer.stream()
        try:
            async for piece in stream:
                await self.send(wire.TokenFrame(message_id=answer.message_id, text=piece))
        except Exception:  # the socket broke while sending: the answer ends as cancelled
            await stream.aclose()
            return
        with contextlib.suppress(Exception):
            if answer.error is not None:
                await self.send_error(answer.error)
            await self.send(
                wire.DoneFrame(
                    message_id=answer.message_id,
                    finish_reason=answer.finish_reason or "error",
                    usage=answer.usage,
                )
            )

    async def close_for_shutdown(self) -> None:
        """The server drains (server/shutdown.py): once this socket's answers have sent their
        last frames, close it with 1012 and a reason, so the client knows to reconnect."""
        tasks = [task for _, task in self.running.values()]
        if tasks:
            await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
        async with self._send_lock:
            with contextlib.suppress(Exception):
                await self.websocket.close(code=SERVICE_RESTART, reason=CLOSE_REASON)

    async def close(self) -> None:
        """The socket is gone: cancel running answers and wait until they are stored."""
        running = list(self.running.values())
        for answer, _ in running:
            answer.request.cancel()
        tasks = [task for _, task in running]
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=CLOSE_TIMEOUT_S)
            for task in late:  # an engine that does not end a cancelled request in time
                task.cancel()
            if late:
                await asyncio.wait(late)


async def _refuse(websocket: WebSocket, exc: BaseException, headers=None) -> None:
    """Accept first so the client can read why, then close: a bare 403 explains nothing."""
    await websocket.accept(headers=headers)
    _, frame = to_wire(exc)
    await websocket.send_text(frame.model_dump_json())
    await websocket.close(code=HANDSHAKE_CLOSE_CODES.get(frame.code, POLICY_VIOLATION), reason=frame.code)


@router.websocket("/ws")
async def chat_socket(websocket: WebSocket, chat: Annotated[Chat, Depends(get_chat)]) -> None:
    try:
        if websocket.app.state.draining:
            raise ShuttingDown()
        caller = await authenticate(chat.pool, chat.settings, token_from(websocket))
    except (ServerError, StoreError, psycopg.OperationalError) as exc:
        await _refuse(websocket, exc)
        return
    headers = [(TOKEN_HEADER.lower().encode(), caller.minted_token.encode())] if caller.minted_token else None
    try:
        # Counted until this handler returns, however the socket ends.
        closed = chat.quotas.open_connection(caller.user.id)
    except TooManyConnections as exc:
        await _refuse(websocket, exc, headers)
        return
    try:
        await websocket.accept(headers=headers)
        await _serve(websocket, caller, chat)
    finally:
        closed()


async def _serve(websocket: WebSocket, caller, chat: Chat) -> None:
    session = Session(websocket, caller.user, chat)
    sessions = websocket.app.state.sessions
    sessions.add(session)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                await session.send_error(
                    BadFrame("binary frames are not accepted: send JSON as a text frame")
                )
                continue
            await session.handle(text)
    except WebSocketDisconnect:
        pass
    except Exception:  # a send on a socket that just went away, mostly
        log.debug("websocket of user %s ended", caller.user.id, exc_info=True)
    finally:
        sessions.discard(session)
        await session.close()
        if websocket.client_state == WebSocketState.CONNECTED:
            with contextlib.suppress(Exception):
                await websocket.close()
