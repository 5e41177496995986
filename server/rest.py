"""The REST API: a user's conversations and their trees, feedback for API users, health.

Errors come back as `{"code", "message"}` with the status of `server/errors.py`'s mapping (the
same codes as websocket error frames).
"""

from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from importlib.metadata import PackageNotFoundError, version
from typing import Annotated

from fastapi import APIRouter, Depends, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from starlette.requests import HTTPConnection

from feedback import store

from . import serving, wire
from .auth import Caller, caller_for_request
from .chat import Chat
from .swap import SwapController

router = APIRouter()
CallerDep = Annotated[Caller, Depends(caller_for_request)]


def get_chat(connection: HTTPConnection) -> Chat:
    """The app's turn logic (opened in the lifespan), for HTTP routes and the websocket."""
    return connection.app.state.chat


ChatDep = Annotated[Chat, Depends(get_chat)]


def get_swaps(connection: HTTPConnection) -> SwapController | None:
    """The swap controller, once the model is loaded and the app follows the registry."""
    return getattr(connection.app.state, "swaps", None)


SwapsDep = Annotated[SwapController | None, Depends(get_swaps)]

ERRORS = {
    400: {"model": wire.ErrorBody, "description": "Malformed id or body"},
    401: {"model": wire.ErrorBody, "description": "Missing or unknown token"},
    404: {"model": wire.ErrorBody, "description": "No such id among yours"},
    422: {"model": wire.ErrorBody, "description": "A field has a value that is not accepted"},
    429: {"model": wire.ErrorBody, "description": "Rate limit"},
}


@router.get("/api/conversations", response_model=list[wire.ConversationSummary], responses=ERRORS)
async def list_conversations(
    caller: CallerDep,
    chat: ChatDep,
    limit: Annotated[int, Query(ge=1, le=store.MAX_PAGE)] = 50,
    before: Annotated[str | None, Query(description="Last id of the previous page")] = None,
):
    """Your conversations, most recently active first."""
    async with chat.pool.connection() as conn:
        found = await store.list_conversations(conn, caller.user, limit, before)
    return [
        wire.ConversationSummary(
            id=c.id, title=c.title, allow_data_use=c.allow_data_use, created_at=c.created_at,
            updated_at=c.updated_at,
        )
        for c in found
    ]


@router.get(
    "/api/conversations/{conversation_id}", response_model=wire.ConversationTree, responses=ERRORS
)
async def conversation_tree(conversation_id: str, caller: CallerDep, chat: ChatDep):
    """One conversation with every message (all branches), oldest first, and your thumbs."""
    async with chat.pool.connection() as conn:
        tree = await store.conversation_tree(conn, caller.user, conversation_id)
    c = tree.conversation
    return wire.ConversationTree(
        id=c.id,
        title=c.title,
        allow_data_use=c.allow_data_use,
        created_at=c.created_at,
        updated_at=c.updated_at,
        messages=[message_node(m) for m in tree.messages],
    )


def message_node(m: store.Message) -> wire.MessageNode:
    written_by = "model" if m.role == "assistant" and m.author_id is None else "user"
    return wire.MessageNode(
        id=m.id,
        parent_id=m.parent_id,
        role=m.role,
        content=m.content,
        created_at=m.created_at,
        model_version=m.model_version,
        finish_reason=m.finish_reason,
        prompt_tokens=m.prompt_tokens,
        completion_tokens=m.completion_tokens,
        params=m.params,
        rating=getattr(m, "rating", None),
        rating_reason=getattr(m, "rating_reason", None),
        written_by=written_by,
        edited_from=m.edited_from,
    )


@router.patch(
    "/api/conversations/{conversation_id}", response_model=wire.ConversationSummary, responses=ERRORS
)
async def update_conversation(
    conversation_id: str, body: wire.ConversationUpdate, caller: CallerDep, chat: ChatDep
):
    """Rename a conversation, or opt it out of (or back into) retraining with
    `allow_data_use`: an opted-out conversation, its thumbs and comparisons are never read by a
    round."""
    async with chat.pool.connection() as conn:
        c = await store.update_conversation(
            conn, caller.user, conversation_id, title=body.title, allow_data_use=body.allow_data_use
        )
    return wire.ConversationSummary(
        id=c.id, title=c.title, allow_data_use=c.allow_data_use, created_at=c.created_at,
        updated_at=c.updated_at,
    )


@router.post("/api/messages/{message_id}/feedback", response_model=wire.AckBody, responses=ERRORS)
async def feedback(message_id: str, body: wire.FeedbackBody, caller: CallerDep, chat: ChatDep):
    """Thumb up (1) or down (-1) an answer; a new thumb replaces your previous one.

    `message_id` is an id from a `started` frame or a chat completion's `id`."""
    rating_id = await chat.feedback(caller.user, message_id, body.rating, body.reason)
    return wire.AckBody(of="feedback", id=rating_id)


@router.post("/api/messages/{message_id}/compare", response_model=wire.AckBody, responses=ERRORS)
async def compare(message_id: str, body: wire.CompareBody, caller: CallerDep, chat: ChatDep):
    """Say whether answer `message_id` is better, worse or the same as `other_id`, another
    answer to the same message (a regeneration)."""
    comparison_id = await chat.compare(caller.user, message_id, body.other_id, body.verdict)
    return wire.AckBody(of="compare", id=comparison_id)


@router.post(
    "/api/messages/{message_id}/edit", response_model=wire.MessageNode, status_code=201,
    responses=ERRORS,
)
async def edit(message_id: str, body: wire.EditBody, caller: CallerDep, chat: ChatDep):
    """Show the answer you wanted: `content` is stored as a sibling of answer `message_id`,
    written by you (a demonstration retraining fine-tunes on), and as the comparison "the edit
    is better than the original". Returns the new message; continue the conversation from it
    like from any answer. A question is edited over the websocket (the `edit` frame), which
    answers the new branch."""
    demonstration = await chat.demonstrate(caller.user, message_id, body.content)
    return message_node(demonstration.message)


class SwapInfo(BaseModel):
    # The version new requests got before, and the one they get since.
    previous: str | None
    version: str
    # When new requests started getting `version` (UTC).
    at: datetime
    # Seconds to verify and load it; null when it was loaded already (a promoted canary).
    load_s: float | None
    # Seconds from hearing of the change (NOTIFY, or the state re-read) to serving it.
    heard_to_swap_s: float
    # Requests still running on `previous` at that moment; they finished on its weights.
    draining: int


class LoadFailureInfo(BaseModel):
    # The version this replica could not load (the previous one kept serving).
    version: str
    # Its checkpoint directory.
    path: str
    # When it failed (UTC).
    at: datetime
    # What went wrong, and how to fix it.
    error: str


class EngineSwitchInfo(BaseModel):
    # The remote engine URL new requests went to before, and the one they go to since.
    previous: str
    url: str
    # When new requests started going to `url` (UTC).
    at: datetime
    # Seconds to probe `url` and check it serves every version (loading adapters there).
    check_s: float
    # Requests still streaming from `previous` at that moment; they finished there.
    draining: int
    # The registry's request (`python -m deploy engine-url`) this carried out.
    request_id: int


class EngineSwitchFailureInfo(BaseModel):
    # The URL this replica refused (the previous one kept serving).
    url: str
    # When (UTC).
    at: datetime
    # What went wrong, and how to fix it.
    error: str
    # The registry's request it refused; `deploy engine-url URL` again asks for a new try.
    request_id: int


class ReplicaServing(BaseModel):
    # This replica's name in the registry's load records (hostname:port).
    replica: str | None = None
    # The versions requests may name now, the default first.
    versions: list[str] = []
    # Replaced versions still finishing their streams here; unloaded once those are done.
    draining: list[str] = []
    # The canary served next to the default, and its share of new conversations in percent
    # (null: no canary, or this replica could not load it).
    canary: str | None = None
    canary_percent: float | None = None
    # What the registry says should serve, as last heard (null: not heard yet).
    registry_serving: str | None = None
    registry_canary: str | None = None
    # Whether this replica serves what the registry says (false while a swap loads, or after
    # a failed load).
    in_sync: bool = False
    # Whether the deploy listener is connected (false while it reconnects to the database).
    listening: bool = False
    # The latest change of the default version, and the latest version that failed to load.
    last_swap: SwapInfo | None = None
    last_failure: LoadFailureInfo | None = None
    # A remote engine's URL for new requests (null: the local engine), and old URLs still
    # finishing their streams after a blue/green switch.
    engine_url: str | None = None
    engine_draining_urls: list[str] = []
    # The URL the registry asks this replica's remote engine to use (null: none asked for, so
    # ENGINE_URL serves).
    registry_engine_url: str | None = None
    # The latest engine URL switch, and the latest URL this replica refused.
    last_engine_switch: EngineSwitchInfo | None = None
    last_engine_switch_failure: EngineSwitchFailureInfo | None = None


class HealthBody(wire.Health, ReplicaServing):
    pass


class VersionBody(wire.Version, ReplicaServing):
    pass


def _replica_serving(chat: Chat, swaps: SwapController | None) -> dict:
    """What this replica serves, for /health and /api/version."""
    found: dict = {}
    engine = chat.engine
    found["engine_url"], found["engine_draining_urls"] = serving.engine_urls(engine)
    if serving.is_ready(engine):
        default = engine.default_version
        found["versions"] = [default, *(v for v in engine.versions() if v != default)]
    if swaps is None:
        return found
    state = swaps.state
    found.update(replica=swaps.replica, in_sync=swaps.in_sync, listening=swaps.listening,
                 draining=swaps.draining)
    if state is not None:
        found["registry_serving"] = state.serving.id if state.serving else None
        found["registry_canary"] = state.canary.id if state.canary else None
        if state.canary is not None and state.canary.id in found.get("versions", ()):
            found.update(canary=state.canary.id, canary_percent=state.canary_percent)
    if swaps.last_swap is not None:
        found["last_swap"] = SwapInfo(**asdict(swaps.last_swap))
    if swaps.last_failure is not None:
        found["last_failure"] = LoadFailureInfo(**asdict(swaps.last_failure))
    wanted = swaps.engine_url_wanted
    found["registry_engine_url"] = wanted.url if wanted is not None else None
    if swaps.last_engine_switch is not None:
        found["last_engine_switch"] = EngineSwitchInfo(**asdict(swaps.last_engine_switch))
    if swaps.last_engine_failure is not None:
        found["last_engine_switch_failure"] = EngineSwitchFailureInfo(**asdict(swaps.last_engine_failure))
    return found


@router.get("/health", response_model=HealthBody, responses={503: {"model": HealthBody}})
async def health(chat: ChatDep, swaps: SwapsDep):
    """200 once the model is loaded and answering; 503 while it loads. Both say what this
    replica serves and how its last swap went."""
    details = _replica_serving(chat, swaps)
    if chat.engine is None or not serving.is_ready(chat.engine):
        body = HealthBody(status="loading", model_version=None, **details)
        return JSONResponse(body.model_dump(mode="json"), status_code=503)
    return HealthBody(status="ok", model_version=chat.engine.default_version, **details)


def _package_version() -> str:
    try:
        return version("flywheel")
    except PackageNotFoundError:
        return "unknown"


@router.get("/api/version", response_model=VersionBody)
async def server_version(chat: ChatDep, swaps: SwapsDep):
    """This server's version, the engine kind, and what this replica serves: the default
    version, every live version, the canary, the last swap and the last failed load; with a
    remote engine its URL, the URL the registry asks for, and the last switch and refusal."""
    ready = chat.engine is not None and serving.is_ready(chat.engine)
    return VersionBody(
        server=_package_version(),
        model_version=chat.engine.default_version if ready else None,
        engine=chat.settings.engine,
        **_replica_serving(chat, swaps),
    )
