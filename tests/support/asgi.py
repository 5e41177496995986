"""An ASGI app on a real uvicorn server inside the running event loop, for tests.

The server runs as a task of the test's loop (`uvicorn.Server.serve`), so the app, its engine
and the test's clients share one loop and nothing crosses threads."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import uvicorn


@asynccontextmanager
async def serve_asgi(app: Any, *, port: int = 0, lifespan: str = "on", **config: Any) -> AsyncIterator[str]:
    """`app` on 127.0.0.1:`port` (0: a free one) until the block ends; yields its base URL.
    `config`: more uvicorn.Config options (e.g. ws_max_size). A failed start-up raises."""
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           lifespan=lifespan, **config))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()  # raises the start-up failure
        await asyncio.sleep(0.02)
    bound = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield f"http://127.0.0.1:{bound}"
    finally:
        server.should_exit = True
        await task
