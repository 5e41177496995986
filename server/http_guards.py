"""The ASGI middleware in front of every HTTP route: `HttpGuards`, below."""

from __future__ import annotations

from starlette.requests import Request

from .auth import TOKEN_HEADER
from .errors import BadJson, FrameTooLarge, ServerError, ShuttingDown, http_response
from .json_depth import too_deep


class HttpGuards:
    """Plain ASGI (not BaseHTTPMiddleware, which gets in the way of streamed responses noticing
    a client that went away): refuses every new HTTP request with 503 `shutting_down` once the
    server drains (server/shutdown.py), refuses HTTP bodies over MAX_FRAME_BYTES before the app
    reads them (by Content-Length, and by reading the body up to the limit), refuses JSON nested
    deeper than MAX_JSON_DEPTH before anything parses it (bad_json), and hands a minted
    anonymous identity back in a header (see auth.py)."""

    def __init__(self, app, limit: int, max_depth: int, state):
        self.app = app
        self.limit = limit
        self.max_depth = max_depth
        self.state = state  # the app's state: `draining`

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.state.draining:
            response = http_response(Request(scope), ShuttingDown())
            return await response(scope, receive, send)
        headers = dict(scope.get("headers", ()))
        length = headers.get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            return await self._refuse(scope, receive, send, FrameTooLarge(int(length), self.limit))
        if length is not None or headers.get(b"transfer-encoding", b"").lower() == b"chunked":
            # Bodies are small (the limit above): read it whole, check it, hand it on.
            body, more = b"", True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    return  # the client left
                body += message.get("body", b"")
                more = message.get("more_body", False)
                if len(body) > self.limit:
                    return await self._refuse(scope, receive, send, FrameTooLarge(len(body), self.limit))
            if too_deep(body.decode("utf-8", "replace"), self.max_depth):
                return await self._refuse(scope, receive, send, BadJson.too_deep(self.max_depth, "body"))
            receive = _replay(body, receive)

        async def send_with_token(message):
            if message["type"] == "http.response.start":
                minted = scope.get("state", {}).get("minted_token")
                if minted:
                    message["headers"] = [
                        *message.get("headers", []),
                        (TOKEN_HEADER.lower().encode(), minted.encode()),
                    ]
            await send(message)

        await self.app(scope, receive, send_with_token)

    async def _refuse(self, scope, receive, send, error: ServerError) -> None:
        response = http_response(Request(scope), error)
        await response(scope, receive, send)


def _replay(body: bytes, receive):
    """A receive that gives the already-read body once, then defers to the real one."""
    sent = False

    async def replayed():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed
