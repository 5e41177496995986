"""Who is calling: a user token from `Authorization: Bearer TOKEN` or `?token=TOKEN`.

Tokens are opaque strings; the store keeps only their SHA-256. Two modes (ALLOW_ANONYMOUS,
true by default with the embedded database):

- Anonymous users admitted. A token seen for the first time registers a new user, so a client
  chooses its own identity: the web page draws 32 random bytes once, keeps them in
  `localStorage` ("flywheel.token") and sends them on every request, which is how a browser keeps
  its conversations across reloads (clearing site data starts a new identity). Self-chosen
  tokens must be at least MIN_TOKEN_CHARS long so nobody can guess another's. A request with no
  token at all gets a fresh identity minted for it, returned in the `X-Flywheel-Token` response
  header (HTTP responses and the websocket handshake); send it back to keep that identity.
- Anonymous users not admitted. Only tokens that already exist (registered by an operator through
  the store's `user_for_token`) are accepted; anything else is 401 / an `unauthorized` close.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from fastapi import Request
from starlette.requests import HTTPConnection

from feedback import store
from feedback.store import User

from .errors import Unauthorized
from .settings import ServerSettings

TOKEN_HEADER = "X-Flywheel-Token"


@dataclass(frozen=True)
class Caller:
    user: User
    # Set when the server minted the identity for this request (no token sent): the client
    # must keep it to come back as the same user.
    minted_token: str | None = None


def token_from(conn: HTTPConnection) -> str | None:
    """The token of an HTTP request or websocket handshake, if any."""
    header = conn.headers.get("authorization")
    if header:
        scheme, _, value = header.partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise Unauthorized(
                "the Authorization header must be 'Bearer TOKEN' (or pass ?token=TOKEN)"
            )
        return value.strip()
    return conn.query_params.get("token") or None


async def authenticate(pool, settings: ServerSettings, token: str | None) -> Caller:
    """The user behind `token` (see the module doc for the two modes)."""
    async with pool.connection() as conn:
        if token is None:
            if not settings.anonymous_allowed:
                raise Unauthorized(
                    "a user token is required: send 'Authorization: Bearer TOKEN' or ?token=TOKEN"
                )
            minted = secrets.token_urlsafe(32)
            return Caller(await store.user_for_token(conn, minted), minted_token=minted)
        found = await store.find_user(conn, token)
        if found is not None:
            return Caller(found)
        if not settings.anonymous_allowed:
            raise Unauthorized("unknown token: ask the operator for a valid one")
        if len(token) < settings.min_token_chars:
            raise Unauthorized(
                f"a new token must be at least {settings.min_token_chars} characters long, so "
                "nobody can guess it: draw a random one (e.g. 32 random bytes, base64)"
            )
        return Caller(await store.user_for_token(conn, token))


async def caller_for_request(request: Request) -> Caller:
    """FastAPI dependency: the caller of an HTTP request (401 when refused)."""
    chat = request.app.state.chat
    caller = await authenticate(chat.pool, chat.settings, token_from(request))
    if caller.minted_token:
        request.state.minted_token = caller.minted_token
    return caller
