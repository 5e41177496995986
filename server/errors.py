"""Every way the server refuses a request, and the one mapping from any failure to a wire error.

Three families reach a client: the store's typed errors (`feedback.errors`: unknown or other
users' ids, over-long text, non-sibling comparisons, ...), the server's own (below: bad frames,
limits, sampling bounds, the engine), and pydantic validation errors of wire types. `to_wire`
turns each into `(http_status, ErrorFrame)`; the websocket sends the frame and carries on, HTTP
answers `{"code", "message"}` with the status (`{"error": {...}}` under /v1, as OpenAI does).

Codes are part of the contract: short snake_case, never renamed.
"""

from __future__ import annotations

import logging
import math
from typing import ClassVar

import psycopg
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse

from feedback.errors import StoreError
from feedback.store import text_problem

from .wire import CLIENT_FRAME_TYPES, INVALID_TEXT, ErrorFrame

log = logging.getLogger(__name__)

# Retry-After of a `database_unavailable`: about when the pool has tried to reconnect again
# (DB_RECONNECT_TIMEOUT bounds its backoff, see server/app.py).
DB_RETRY_AFTER_S = 2


class ServerError(Exception):
    code: ClassVar[str] = "server_error"
    http_status: ClassVar[int] = 500

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadJson(ServerError):
    code = "bad_json"
    http_status = 400

    @classmethod
    def undecodable(cls, detail: str) -> BadJson:
        return cls(f"the frame is not valid JSON ({detail}): send one JSON object per text frame")

    @classmethod
    def too_deep(cls, limit: int, what: str = "frame") -> BadJson:
        # Refused before parsing: a deep enough document makes a parser recurse to its limit.
        return cls(
            f"the {what} is not accepted as JSON: it is nested more than {limit} levels deep "
            "(operators can raise MAX_JSON_DEPTH)"
        )


class BadFrame(ServerError):
    """A frame or body that is JSON but not one the contract knows (see `from_validation`)."""

    code = "invalid_frame"
    http_status = 422


class UnknownType(BadFrame):
    code = "unknown_type"


class InvalidText(BadFrame):
    """Text PostgreSQL or the tokenizer cannot hold (a NUL, a lone surrogate), in a field."""

    code = "invalid_text"


class HttpRefusal(ServerError):
    """What Starlette itself refuses (no such route, a method the route does not take, a body
    it cannot read), worded and shaped like every other error."""

    CODES: ClassVar[dict[int, str]] = {
        400: "bad_request", 404: "not_found", 405: "method_not_allowed", 413: "frame_too_large",
    }

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.http_status = status  # type: ignore[misc] - per instance, as Starlette gave it
        self.code = self.CODES.get(status, "http_error")  # type: ignore[misc]


class FrameTooLarge(ServerError):
    code = "frame_too_large"
    http_status = 413

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"the frame is {size} bytes, over the limit of {limit}: send less "
            "(operators can raise MAX_FRAME_BYTES)"
        )


class TooManyConnections(ServerError):
    code = "too_many_connections"
    http_status = 429

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you already have {limit} websocket connections open, the most at once: close one "
            "(one connection carries any number of conversations; operators can raise "
            "MAX_CONNECTIONS_PER_USER)"
        )


class TooManyGenerations(ServerError):
    code = "too_many_generations"
    http_status = 429

    def __init__(self, limit: int) -> None:
        super().__init__(
            f"you already have {limit} answers being generated, the most at once: wait for one "
            "to finish or cancel it (operators can raise MAX_CONCURRENT_GENERATIONS)"
        )


class RateLimited(ServerError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, per_minute: int, retry_after_s: int) -> None:
        super().__init__(
            f"over the limit of {per_minute} requests per minute: try again in {retry_after_s} s "
            "(operators can raise RATE_LIMIT_PER_MINUTE)"
        )
        self.retry_after_s = retry_after_s


class InvalidParams(ServerError):
    """Sampling parameters the server will not use (over a bound, or refused by the engine)."""

    code = "invalid_params"
    http_status = 422

    @classmethod
    def over_limit(cls, name: str, value: object, limit: object, setting: str) -> InvalidParams:
        return cls(
            f"params.{name} = {value!r} is over the server's limit of {limit}: ask for less "
            f"(operators can raise {setting})"
        )


class PromptTooLongError(ServerError):
    """The newest message (with the system prompt) does not fit the context on its own."""

    code = "prompt_too_long"
    http_status = 413


class InvalidConversationError(ServerError):
    """A conversation the model cannot answer (e.g. a system message after the first turn)."""

    code = "invalid_conversation"
    http_status = 422


class Overloaded(ServerError):
    code = "overloaded"
    http_status = 503


class Unauthorized(ServerError):
    code = "unauthorized"
    http_status = 401


class UnknownModel(ServerError):
    code = "model_not_found"
    http_status = 404

    def __init__(self, model: str, served: list[str]) -> None:
        super().__init__(
            f"model {model!r} is not served here: use 'default' or one of {served} (GET /v1/models)"
        )


class NotReady(ServerError):
    """No model is loaded yet (or the engine is shutting down)."""

    code = "not_ready"
    http_status = 503

    def __init__(self) -> None:
        super().__init__("the model is still loading: try again in a few seconds (GET /health)")


class DatabaseUnavailable(ServerError):
    """The store cannot be reached (no pooled connection within DB_WAIT_TIMEOUT, or the
    connection broke mid-request): nothing of this request was stored."""

    code = "database_unavailable"
    http_status = 503

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(
            "the database is unavailable, so nothing of this request was stored: try again in "
            f"{self.retry_after_s} s"
        )


class AnswerNotStored(ServerError):
    """An answer was generated (and streamed) but could not be stored (the database stayed
    unavailable for ANSWER_STORE_RETRY_S, or the write failed): the turn is left with the user's
    message stored and no answer under it."""

    code = "answer_not_stored"
    http_status = 503

    def __init__(self, message_id, question_id, why: str, retry_after_s: float) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(
            f"the answer {message_id} could not be stored: {why}. Your message {question_id} is "
            "stored, with no answer under it; send it again once the service is back to get an "
            "answer that is kept"
        )


class ShuttingDown(ServerError):
    """The server got SIGTERM: it finishes what is running and takes no new work."""

    code = "shutting_down"
    http_status = 503

    def __init__(self, retry_after_s: float = 1) -> None:
        self.retry_after_s = max(1, math.ceil(retry_after_s))
        super().__init__(
            "the server is shutting down and takes no new requests: retry in a moment "
            "(another replica, or this one once it is back)"
        )


class EngineFailed(ServerError):
    """The engine failed this request (its own account goes to the server's log, never to the
    client: it may hold torch's messages or a remote engine's URL and reply)."""

    code = "engine_error"
    http_status = 502

    def __init__(self) -> None:
        super().__init__(
            "the model failed while answering this request; the partial answer was kept "
            "(the server's log says why): try again, or regenerate it"
        )


class NothingToRegenerate(ServerError):
    code = "not_assistant"
    http_status = 422


# Where FastAPI says a request's field was (the body, the query string, ...): not part of
# the field's name as people write it.
_REQUEST_PARTS = ("body", "query", "path", "header")
_TEXT_ERRORS = (INVALID_TEXT, "string_unicode")


def describe_validation(errors: list[dict]) -> tuple[str, str]:
    """The code and a one-line account of what was wrong with a frame or body, naming each
    field: pydantic's errors of wire types and FastAPI's of request bodies alike."""
    code = BadFrame.code
    problems = []
    # Text that cannot be stored is the whole story: a union field (content: str | parts)
    # would add "should be a valid list" for the branch the client did not mean.
    # (pydantic's own str validation refuses a lone surrogate as "string_unicode".)
    errors = [e for e in errors if e.get("type") in _TEXT_ERRORS] or errors
    for e in errors:
        kind = e.get("type", "")
        loc = [str(p) for p in e.get("loc", ())]
        # FastAPI puts the part of the request first, and a discriminated union the tag (e.g.
        # "message"); people think of fields by name, so drop them.
        if loc and loc[0] in _REQUEST_PARTS:
            loc = loc[1:]
        if loc and loc[0] in CLIENT_FRAME_TYPES:
            loc = loc[1:]
        # Union members of a field (e.g. content: str | list[part]) are noise in its name.
        # (pydantic names them by type: "str", "list[TextPart]", "function-after[...]".)
        loc = [p for p in loc if p != "str" and "[" not in p]
        field = ".".join(loc)
        if kind == "union_tag_invalid":
            code = UnknownType.code
            tag = e.get("ctx", {}).get("tag")
            problems.append(
                f"unknown frame type {tag!r}: the types are {', '.join(CLIENT_FRAME_TYPES)}"
            )
        elif kind == "union_tag_not_found":
            code = UnknownType.code
            problems.append(f"the frame has no 'type': one of {', '.join(CLIENT_FRAME_TYPES)}")
        elif kind == "json_invalid":  # an HTTP body (422 invalid_frame, as it always was)
            problems.append(f"the body is not valid JSON ({e.get('ctx', {}).get('error', '')})")
        elif kind in _TEXT_ERRORS:
            code = InvalidText.code
            got = e.get("input")
            problem = text_problem(got) if isinstance(got, str) else None
            problems.append(f"'{field}' {problem or e.get('msg')}")
        elif kind == "missing":
            problems.append(f"'{field or 'the body'}' is missing")
        elif kind == "extra_forbidden":
            problems.append(f"'{field}' is not a field of this frame")
        elif kind == "model_attributes_type" or kind == "model_type":
            problems.append(f"{'the frame' if not field else repr(field)} must be a JSON object")
        else:
            got = e.get("input")
            shown = repr(got) if len(repr(got)) <= 60 else repr(got)[:57] + "..."
            problems.append(f"'{field or 'the body'}' {e.get('msg', 'is invalid').lower()} (got {shown})")
    return code, "; ".join(problems) or "the request is not valid"


_BY_CODE = {cls.code: cls for cls in (BadFrame, UnknownType, InvalidText)}


def from_validation(errors: list[dict]) -> ServerError:
    """The error for a frame or body that failed validation (`err.errors()`)."""
    code, message = describe_validation(errors)
    return _BY_CODE[code](message)


def typed(exc: BaseException) -> BaseException:
    """The error a client is told about: validation errors and a database that cannot be
    reached become their server errors; anything else is returned as it is."""
    if isinstance(exc, ValidationError):
        return from_validation(exc.errors())
    if isinstance(exc, psycopg.OperationalError):
        # The pool's wait ran out (PoolTimeout is an OperationalError) or the connection broke.
        log.warning("database unavailable: %s: %s", type(exc).__name__, exc)
        return DatabaseUnavailable(DB_RETRY_AFTER_S)
    return exc


def to_wire(exc: BaseException) -> tuple[int, ErrorFrame]:
    """The HTTP status and the error frame for any failure; unexpected ones are logged."""
    exc = typed(exc)
    if isinstance(exc, (ServerError, StoreError)):
        return exc.http_status, ErrorFrame(code=exc.code, message=exc.message)
    log.exception("unexpected error", exc_info=exc)
    # No exception text: it is for the operator's log, not for whoever sent the request.
    return 500, ErrorFrame(
        code="internal_error",
        message="the server failed; nothing was stored for this request",
    )


def http_response(request: Request, exc: BaseException) -> JSONResponse:
    """The HTTP answer to any failure, from the app's error handlers and from the middleware
    that refuses before the app runs (server/http_guards.py): the status, Retry-After where the
    error has one, the body in OpenAI's shape under /v1 and `{"code", "message"}` elsewhere; each
    refusal is counted by code."""
    exc = typed(exc)
    status, frame = to_wire(exc)
    metrics = getattr(request.app.state, "metrics", None) if "app" in request.scope else None
    if metrics is not None:
        metrics.refusals.labels(frame.code).inc()
    headers = {}
    retry = getattr(exc, "retry_after_s", None)
    if retry:
        headers["Retry-After"] = str(retry)
    if request.url.path.startswith("/v1/"):
        # OpenAI's error shape, which its clients parse into APIStatusError.message.
        kind = "invalid_request_error" if status < 500 else "server_error"
        body = {"error": {"message": frame.message, "type": kind, "code": frame.code, "param": None}}
    else:
        body = {"code": frame.code, "message": frame.message}
    return JSONResponse(body, status_code=status, headers=headers)

