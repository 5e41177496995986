"""OpenAI-compatible API under /v1: chat completions (SSE streaming or not) and the model list.

How an API request lands in the store: its `messages` array is a path of the message tree,
root first (a leading system message is the root). The server looks the array up among the
caller's stored paths (same roles and contents, in order):
- found whole (the same question asked again): the answer is stored as one more child of its
  last message, a sibling of the earlier answers, so the two can be compared;
- found except the last user message, after an assistant turn (the client continues a
  conversation by re-sending our answer): the user message and the answer continue that path;
- otherwise: a new conversation holding the messages in order. Assistant turns the client
  supplies are stored with model_version "client-supplied", since no policy of ours wrote them.
The response `id` is the stored answer's id, so `POST /api/messages/{id}/feedback` and
`/compare` work for API users too.

`model` may be "default" (or omitted) or a version from `GET /v1/models`. "default" follows the
canary like a new websocket conversation does: a continued conversation keeps its version, and
a new one gets the canary for the canary's share of API clients, chosen on the client's user,
so one client sees one policy (see Chat._api_version). Sampling:
temperature, top_p and max_tokens (or max_completion_tokens) within the server's bounds.
Errors use OpenAI's shape, `{"error": {"message", "type", "code"}}`.
"""

from __future__ import annotations

import json
import time
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

from . import serving
from .auth import Caller, caller_for_request
from .chat import Answer, Chat
from .errors import BadFrame, to_wire
from .rest import get_chat
from .wire import SamplingParams, Text

router = APIRouter(prefix="/v1", tags=["OpenAI-compatible"])
CallerDep = Annotated[Caller, Depends(caller_for_request)]
ChatDep = Annotated[Chat, Depends(get_chat)]

ROLE_ALIASES = {"developer": "system"}  # OpenAI's newer name for the system role


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: Text


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    # system | developer (stored as system) | user | assistant.
    role: Literal["system", "developer", "user", "assistant"]
    # A string, or a list of text parts (joined with newlines).
    content: Text | list[TextPart]

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    # Send a last chunk with token usage (and no choices).
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    # OpenAI clients send many optional fields; unknown ones are ignored, unsupported ones
    # with a meaning we cannot honour (n > 1, tools) are refused.
    model_config = ConfigDict(extra="allow")
    # "default" (the serving policy, or the canary for its share of clients) or a served
    # version (GET /v1/models).
    model: str = "default"
    # The conversation so far; the last message must be the user's.
    messages: list[ChatMessage] = Field(min_length=1)
    # Stream the answer as server-sent events.
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    # As SamplingParams' (server/engine/base.py): strict numbers, finite, within bounds.
    temperature: float | None = SamplingParams.model_fields["temperature"]
    top_p: float | None = SamplingParams.model_fields["top_p"]
    # Longest answer, in tokens (max_completion_tokens is the newer name).
    max_tokens: int | None = SamplingParams.model_fields["max_new_tokens"]
    max_completion_tokens: int | None = SamplingParams.model_fields["max_new_tokens"]
    # Only 1 is supported.
    n: StrictInt = Field(1, ge=1)
    tools: list[Any] | None = None


def _check_supported(request: ChatCompletionRequest) -> list[dict[str, str]]:
    if request.n != 1:
        raise BadFrame(f"n = {request.n} is not supported: ask for one answer per request (n = 1)")
    if request.tools:
        raise BadFrame("tools are not supported by this server: send no 'tools'")
    messages = [
        {"role": ROLE_ALIASES.get(m.role, m.role), "content": m.text()} for m in request.messages
    ]
    if messages[-1]["role"] != "user":
        raise BadFrame(
            f"the last message is the {messages[-1]['role']}'s: end 'messages' with the user's turn"
        )
    return messages


def _completion(answer: Answer, created: int) -> dict[str, Any]:
    return {
        "id": str(answer.message_id),
        "object": "chat.completion",
        "created": created,
        "model": answer.model_version,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": answer.text},
                "finish_reason": answer.finish_reason,
            }
        ],
        "usage": answer.usage.model_dump(),
    }


def _chunk(answer: Answer, created: int, delta: dict, finish: str | None) -> str:
    body = {
        "id": str(answer.message_id),
        "object": "chat.completion.chunk",
        "created": created,
        "model": answer.model_version,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


class AnswerStream(StreamingResponse):
    """Server-sent events of one answer. However the response ends (finished, or the client
    went away and a send failed), the event generator is closed here and now, not whenever
    the garbage collector gets to it, so a dropped stream is stored as "cancelled" at once."""

    def __init__(self, answer: Answer, created: int, include_usage: bool):
        super().__init__(
            _sse(answer, created, include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )
        self.answer = answer

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.body_iterator.aclose()
            self.answer.abandon()  # no-op when the answer was streamed


async def _sse(answer: Answer, created: int, include_usage: bool):
    stream = answer.stream()
    try:
        yield _chunk(answer, created, {"role": "assistant", "content": ""}, None)
        async for piece in stream:
            yield _chunk(answer, created, {"content": piece}, None)
    finally:
        await stream.aclose()  # stores the answer, "cancelled" if we are leaving early
    if answer.error is not None:
        _, frame = to_wire(answer.error)
        error = {"message": frame.message, "type": "server_error", "code": frame.code, "param": None}
        yield f"data: {json.dumps({'error': error})}\n\n"
    else:
        yield _chunk(answer, created, {}, answer.finish_reason)
    if include_usage:
        body = {
            "id": str(answer.message_id),
            "object": "chat.completion.chunk",
            "created": created,
            "model": answer.model_version,
            "choices": [],
            "usage": answer.usage.model_dump(),
        }
        yield f"data: {json.dumps(body)}\n\n"
    yield "data: [DONE]\n\n"


@router.post("/chat/completions")
async def chat_completions(request: ChatCompletionRequest, caller: CallerDep, chat: ChatDep):
    """Answer a conversation; the response `id` is the stored answer's id (see the module doc)."""
    messages = _check_supported(request)
    params = SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        max_new_tokens=request.max_completion_tokens or request.max_tokens,
    )
    model = None if request.model == "default" else request.model
    answer = await chat.start_from_messages(caller.user, messages, params, model)
    created = int(time.time())
    if request.stream:
        include_usage = bool(request.stream_options and request.stream_options.include_usage)
        return AnswerStream(answer, created, include_usage)
    await answer.run()
    if answer.error is not None and (not answer.text or answer.stored is None):
        raise answer.error  # nothing said, or not stored (the `id` would name no message)
    return _completion(answer, created)


@router.get("/models")
async def list_models(chat: ChatDep):
    """What this server serves: "default" (the serving policy) and every loaded version."""
    created = int(time.time())
    ids = ["default"]
    if chat.engine is not None and serving.is_ready(chat.engine):
        ids += chat.engine.versions()
    return {
        "object": "list",
        "data": [{"id": i, "object": "model", "created": created, "owned_by": "flywheel"} for i in ids],
    }
