"""Wire types: every frame of the websocket contract (DESIGN.md, "Contract") and the bodies of
the REST API, as pydantic models with a comment per field.

Client frames are parsed with one discriminated union on `type`, so an unknown type, a missing
field and a mistyped field each produce a validation error naming the field; `errors.py` turns
it into an error frame. Unknown fields are refused too: a misspelt `conversationId` silently
ignored would start a new conversation instead of continuing one.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, TypeAdapter
from pydantic_core import PydanticCustomError

from feedback.store import text_problem

# Sampling parameters and token counts: one type each, from the wire to the engine (defined
# there, with a comment per field), re-exported as wire types.
from .engine.base import SamplingParams, Usage

__all__ = ["SamplingParams", "Usage"]


class _Frame(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---------------------------------------------------------------------------------------------
# Field types every frame and body shares.

INVALID_TEXT = "invalid_text"  # the validation error type of Text (errors.py: code invalid_text)


def _storable(value: str) -> str:
    problem = text_problem(value)
    if problem:
        raise PydanticCustomError(INVALID_TEXT, problem)
    return value


# Text a person wrote: checked here, before any SQL or tokenization, for what PostgreSQL and
# the tokenizer cannot hold (a NUL, a lone surrogate); the error names the field.
Text = Annotated[str, AfterValidator(_storable)]


def _exact_int(value: Any) -> Any:
    # Literal[1, -1] alone takes true and 1.0 (they equal 1): a vote is a JSON integer.
    if isinstance(value, bool) or not isinstance(value, int):
        raise PydanticCustomError("int_type", "Input should be 1 or -1, a JSON integer")
    return value


# A thumb: 1 up, -1 down, strictly (not true, 1.0 or "1").
Rating = Annotated[Literal[1, -1], BeforeValidator(_exact_int)]


# ---------------------------------------------------------------------------------------------
# Client -> server frames.


class MessageFrame(_Frame):
    type: Literal["message"]
    # null or absent: start a new conversation.
    conversation_id: UUID | None = None
    # The message this one answers; null or absent: continue from the newest message of the
    # conversation. Give it to branch (edit an earlier turn).
    parent_id: UUID | None = None
    # What the user said.
    content: Text = Field(min_length=1)
    # Optional sampling parameters for the answer.
    params: SamplingParams | None = None


class RegenerateFrame(_Frame):
    type: Literal["regenerate"]
    # An assistant message: the new answer becomes its sibling (same parent, same prompt).
    message_id: UUID
    # Optional sampling parameters for the new answer.
    params: SamplingParams | None = None


class FeedbackFrame(_Frame):
    type: Literal["feedback"]
    # The assistant message rated.
    message_id: UUID
    # 1: thumbs up, -1: thumbs down. Rating again replaces the previous vote.
    rating: Rating
    # Optional free text: why.
    reason: Text | None = None


class CompareFrame(_Frame):
    type: Literal["compare"]
    # One answer ...
    message_id: UUID
    # ... and a sibling of it (another answer to the same message).
    other_id: UUID
    # message_id is better / worse / the same as other_id.
    verdict: Literal["better", "worse", "same"]


class EditFrame(_Frame):
    type: Literal["edit"]
    # An assistant answer: `content` is the answer the user wanted (a demonstration, stored as
    # a sibling written by the user and as "the edit beats the original"; acked with the new
    # id). The user's own question: a new branch (a sibling question), answered like a
    # message frame (started, token..., done).
    message_id: UUID
    # The new text (refused when empty, over MAX_MESSAGE_CHARS or unchanged).
    content: str
    # Edited question only: sampling parameters for its answer.
    params: SamplingParams | None = None


class CancelFrame(_Frame):
    type: Literal["cancel"]
    # The answer to stop; absent: every generation running on this connection.
    message_id: UUID | None = None


ClientFrame = Annotated[
    MessageFrame | RegenerateFrame | FeedbackFrame | CompareFrame | EditFrame | CancelFrame,
    Field(discriminator="type"),
]
client_frame = TypeAdapter(ClientFrame)
CLIENT_FRAME_TYPES = ("message", "regenerate", "feedback", "compare", "edit", "cancel")


# ---------------------------------------------------------------------------------------------
# Server -> client frames. Every `started` is followed by exactly one `done` with the same
# message_id, whatever happens (stop, length, cancel, disconnect, engine failure).


class StartedFrame(BaseModel):
    type: Literal["started"] = "started"
    # The conversation the answer belongs to (new when the message frame had none).
    conversation_id: UUID
    # The id the answer will be stored under; use it for feedback, compare and regenerate.
    message_id: UUID
    # The message answered: the stored user message (message frame) or the shared parent
    # (regenerate frame).
    parent_id: UUID
    # The checkpoint generating the answer.
    model_version: str


class TokenFrame(BaseModel):
    type: Literal["token"] = "token"
    # The answer being streamed.
    message_id: UUID
    # The next piece of text (may be several tokens, or part of a character sequence).
    text: str


class DoneFrame(BaseModel):
    type: Literal["done"] = "done"
    # The answer finished, now stored.
    message_id: UUID
    # stop: end of turn; length: hit max_new_tokens; cancelled: a cancel frame (the partial
    # answer is stored); error: the engine failed (an error frame says why).
    finish_reason: Literal["stop", "length", "cancelled", "error"]
    # Token counts.
    usage: Usage


class AckFrame(BaseModel):
    type: Literal["ack"] = "ack"
    # Which client frame is acknowledged; sent only after the row is committed.
    of: Literal["feedback", "compare", "edit"]
    # The stored rating or comparison id; for an edit, the new message's id.
    id: int | str


class ErrorFrame(BaseModel):
    type: Literal["error"] = "error"
    # Stable snake_case code (see server/errors.py for the list).
    code: str
    # What was wrong and how to fix it, for a person.
    message: str


# ---------------------------------------------------------------------------------------------
# REST bodies.


class FeedbackBody(_Frame):
    # 1: thumbs up, -1: thumbs down.
    rating: Rating
    # Optional free text: why.
    reason: Text | None = None


class CompareBody(_Frame):
    # A sibling answer of the message in the path.
    other_id: UUID
    # The message in the path is better / worse / the same as other_id.
    verdict: Literal["better", "worse", "same"]


class EditBody(_Frame):
    # The answer you wanted instead of the one in the path (a demonstration): stored as its
    # sibling, written by you, and as "this edit is better than the original".
    content: str


class AckBody(BaseModel):
    # Which request is acknowledged.
    of: Literal["feedback", "compare"]
    # The stored rating or comparison id.
    id: int | str


class ConversationSummary(BaseModel):
    # The conversation's id (the `conversation_id` of frames).
    id: UUID
    # The start of its first user message.
    title: str
    # false: retraining never reads this conversation (nor its thumbs and comparisons).
    allow_data_use: bool = True
    created_at: datetime
    # When its last message was added (lists are ordered by it, newest first).
    updated_at: datetime


class MessageNode(BaseModel):
    id: UUID
    # The message this one answers; null for the first message of a conversation. Messages
    # sharing a parent are siblings (regenerations, or branches).
    parent_id: UUID | None
    # system | user | assistant.
    role: Literal["system", "user", "assistant"]
    content: str
    created_at: datetime
    # Assistant messages: the checkpoint that wrote it ("client-supplied" for history an API
    # client sent).
    model_version: str | None = None
    # Assistant messages: stop | length | cancelled | error.
    finish_reason: str | None = None
    # Assistant messages: tokens in its prompt and in the answer.
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Assistant messages: the sampling parameters used (temperature, top_p, max_new_tokens).
    params: dict[str, Any] = Field(default_factory=dict)
    # The caller's current thumb on it (1 or -1), if any, and its reason.
    rating: int | None = None
    rating_reason: str | None = None
    # Who wrote the text: "model" (the policy in model_version) or "user" (the conversation's
    # user or client: user turns, system prompts, and an answer the user edited into the one
    # they wanted, a demonstration).
    written_by: Literal["model", "user"] = "model"
    # An edit (a demonstration, or an edited question): the sibling it was edited from.
    edited_from: UUID | None = None


class ConversationTree(BaseModel):
    # As in ConversationSummary.
    id: UUID
    title: str
    allow_data_use: bool = True
    created_at: datetime
    updated_at: datetime
    # Every message of every branch, oldest first; parent_id gives the tree.
    messages: list[MessageNode]


class ConversationUpdate(_Frame):
    # A new title (absent: unchanged).
    title: Text | None = Field(None, min_length=1)
    # false: keep this conversation out of retraining from now on; true: allow it again
    # (absent: unchanged). Strict: "no" or 0 is refused, not read as false.
    allow_data_use: bool | None = Field(None, strict=True)


class ErrorBody(BaseModel):
    # The same codes as the websocket's error frames (server/errors.py lists them).
    code: str
    # What was wrong and how to fix it.
    message: str


class Health(BaseModel):
    # ok: the model is loaded and answers; loading: not yet (HTTP 503).
    status: Literal["ok", "loading"]
    # The version new conversations get, once loaded.
    model_version: str | None


class Version(BaseModel):
    # The package version of this server.
    server: str
    # The checkpoint serving new conversations.
    model_version: str | None
    # local | remote.
    engine: str
