"""The FastAPI application: `create_app(settings, engine=None)`.

The lifespan opens what the app needs, never at import: the database URL (starting the embedded
PostgreSQL when DATABASE_URL is unset), the migrations, the connection pool, then the model.
The model loads in the background (the first run converts SmolLM2, tens of seconds), so the page
and /health answer at once; /health turns 200 and generation requests are accepted once it is
loaded (before that, they get `not_ready`). Then the base model is registered (it serves when
nothing does yet) and the swap controller follows the registry (server/swap.py). Tests pass an
engine of their own, which the app uses (and swaps) as is and does not close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from contextlib import asynccontextmanager
from pathlib import Path

import psycopg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles
from psycopg_pool import AsyncConnectionPool
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from deploy import registry
from feedback.db import database_url
from feedback.errors import StoreError
from feedback.migrate import migrate

from . import openai_api, rest, serving, ws
from .chat import Chat
from .errors import HttpRefusal, ServerError, from_validation, http_response
from .http_guards import HttpGuards
from .metrics import Metrics
from .quotas import Quotas
from .settings import ServerSettings
from .swap import SwapController, replica_name

log = logging.getLogger(__name__)
STATIC = Path(__file__).parent / "static"


def create_app(settings: ServerSettings | None = None, engine=None) -> FastAPI:
    settings = settings or ServerSettings()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        url = await asyncio.to_thread(database_url, settings)
        await asyncio.to_thread(migrate, url)
        pool = AsyncConnectionPool(
            url,
            min_size=settings.db_pool_min,
            max_size=settings.db_pool_max,
            # Store functions open their own transactions; autocommit keeps every other read
            # from leaving a connection idle in a transaction. connect_timeout: an unreachable
            # host fails an attempt instead of hanging it.
            kwargs={"autocommit": True, "connect_timeout": max(2, math.ceil(settings.db_wait_timeout))},
            # A request waits this long for a connection, then gets 503 database_unavailable.
            timeout=settings.db_wait_timeout,
            # Every checkout is checked (an empty query): a connection broken while it sat idle
            # (the database restarted) is thrown away and replaced, not handed to a request.
            check=AsyncConnectionPool.check_connection,
            # A lost connection is retried with backoff for this long, then given up; the next
            # request starts a fresh attempt. Unbounded, the backoff grows past the outage and
            # the pool comes back tens of seconds after the database does.
            reconnect_timeout=settings.db_reconnect_timeout,
            open=False,
        )
        await pool.open(wait=True)
        quotas = Quotas(
            settings.rate_limit_per_minute,
            settings.max_concurrent_generations,
            settings.rate_limit_storage,
            max_connections=settings.max_connections_per_user,
        )
        chat = Chat(pool, engine, settings, quotas, metrics)
        app.state.settings = settings
        app.state.pool = pool
        app.state.chat = chat
        app.state.swaps = None
        app.state.sessions = set()  # open websocket sessions, closed last on shutdown
        starting = asyncio.create_task(
            _serve_model(app, url, owns_engine=engine is None), name="serve-model"
        )
        try:
            yield
        finally:
            starting.cancel()
            with contextlib.suppress(BaseException):
                await starting
            if app.state.swaps is not None:
                await app.state.swaps.stop()
            if engine is None and chat.engine is not None:
                await chat.engine.close()
            await pool.close()

    app = FastAPI(
        title="Flywheel",
        summary="A chat service that learns from its users.",
        description="Chat over the websocket `/ws` (frames in DESIGN.md's contract) or the "
        "OpenAI-compatible `/v1/chat/completions`; rate answers with `/api/messages/{id}/feedback` "
        "and `/compare`. Send your token as `Authorization: Bearer TOKEN`.",
        lifespan=lifespan,
    )
    metrics = Metrics(
        lambda: getattr(getattr(app.state, "chat", None), "engine", None),
        lambda: getattr(app.state, "swaps", None),
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.draining = False  # set on SIGTERM (server/shutdown.py)
    _install_error_handlers(app)
    app.add_middleware(HttpGuards, limit=settings.max_frame_bytes, max_depth=settings.max_json_depth,
                       state=app.state)
    app.include_router(rest.router)
    app.include_router(openai_api.router)
    app.include_router(ws.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    app.mount("/metrics", metrics.app, name="metrics")

    @app.get("/", include_in_schema=False)
    async def index() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    return app


async def _serve_model(app: FastAPI, database_url: str, *, owns_engine: bool) -> None:
    """Load the model (unless the app was given an engine), register the base model it serves
    (the first policy of a fresh registry), then follow the registry: promotions, rollbacks and
    canaries swap the engine's versions (server/swap.py)."""
    chat: Chat = app.state.chat
    settings: ServerSettings = app.state.settings
    if owns_engine and not await _load_engine(chat, settings):
        return
    replica = settings.replica_name or replica_name(settings.host, settings.port)
    # A given engine's base is known only through MODEL; without it (most tests), the registry
    # is left as it is and whatever it says serves is loaded.
    if owns_engine or settings.model:
        try:
            base_dir = await asyncio.to_thread(serving.base_model_dir, settings)
            await asyncio.to_thread(_register_base, database_url, base_dir, replica)
        except Exception:
            log.exception("could not register the base model; serving what the registry says")
    swaps = SwapController(
        chat.engine,
        database_url,
        app.state.pool,
        replica=replica,
        metrics=app.state.metrics,
        # Streams on a replaced version get as long to finish as after a blue/green switch.
        drain_timeout_s=settings.engine_drain_timeout,
        listen=settings,
    )
    app.state.swaps = chat.swaps = swaps
    swaps.start()


def _register_base(database_url: str, base_dir, actor: str) -> None:
    with registry.connect(database_url) as conn:
        base = registry.register_base(conn, base_dir, actor=actor)
        state = registry.read_state(conn)
    log.info("base model %s registered; the registry serves %s", base.id,
             state.serving.id if state.serving else "nothing")


async def _load_engine(chat: Chat, settings: ServerSettings) -> bool:
    try:
        chat.engine = await serving.load(settings)
        log.info("model loaded: serving %s", chat.engine.default_version)
        return True
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("the model failed to load; /health stays 503")
        return False


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(StoreError)
    async def store_error(request: Request, exc: StoreError):
        return http_response(request, exc)

    @app.exception_handler(ServerError)
    async def server_error(request: Request, exc: ServerError):
        return http_response(request, exc)

    @app.exception_handler(psycopg.OperationalError)
    async def database_error(request: Request, exc: psycopg.OperationalError):
        return http_response(request, exc)  # 503 database_unavailable (errors.to_wire)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError):
        return http_response(request, from_validation(list(exc.errors())))

    @app.exception_handler(ValidationError)
    async def invalid_model(request: Request, exc: ValidationError):
        return http_response(request, from_validation(exc.errors()))

    @app.exception_handler(StarletteHTTPException)
    async def refused_by_starlette(request: Request, exc: StarletteHTTPException):
        # No such route, a method the route does not take, a body FastAPI could not read: in
        # the same shapes as every other error (OpenAI's under /v1), not {"detail": ...}.
        return http_response(request, HttpRefusal(exc.status_code, str(exc.detail)))

    @app.exception_handler(Exception)
    async def unexpected(request: Request, exc: Exception):
        # Starlette answers these with a plain-text 500; to_wire logs the traceback and says
        # nothing of it to the client. (The exception is still re-raised after, for uvicorn.)
        return http_response(request, exc)
