"""Graceful shutdown: SIGTERM (or SIGINT) drains the server before uvicorn stops it.

uvicorn alone closes websockets at once (1012, no `done`), cuts HTTP streams after its
timeout_graceful_shutdown by cancelling their tasks (no final chunk, a CancelledError
traceback), and re-raises the signal once done, so the process dies of it. `DrainingServer`
instead, on the first signal:

1. marks the app draining: a new HTTP request gets 503 `shutting_down` with Retry-After (the
   listening socket stays open meanwhile, so clients get an answer rather than a refused
   connection), a new websocket gets that error frame and close code 1012 with reason
   "shutting_down", and a `message` / `regenerate` frame on an open socket gets the error frame
   (feedback and comparisons are still stored);
2. lets running answers finish for up to SHUTDOWN_TIMEOUT seconds, then cancels the rest: each
   ends like any cancelled answer, stored exactly as far as it was delivered, with its `done`
   frame (over SSE: the final chunk with its finish_reason, then `[DONE]`);
3. closes every websocket with 1012 "shutting_down", then lets uvicorn stop as usual (the
   lifespan closes the engine and the pool), and the process exits 0.

A second signal stops at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import uvicorn
from fastapi import FastAPI

log = logging.getLogger(__name__)

SERVICE_RESTART = 1012  # websocket close code: the server is going away, reconnect later
CLOSE_REASON = "shutting_down"
# After the cancelled answers are told to stop: how long their engine gets to end them, on top
# of the time their storing may take (ANSWER_STORE_RETRY_S).
CANCEL_GRACE_S = 5.0
POLL_S = 0.05


async def _wait(done: Callable[[], bool], timeout: float, stop_now: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout
    while not done() and not stop_now() and time.monotonic() < deadline:
        await asyncio.sleep(POLL_S)


async def drain(app: FastAPI, timeout: float, stop_now: Callable[[], bool] = lambda: False) -> None:
    """Steps 1-3 of the module doc, for `app` (a create_app one)."""
    app.state.draining = True  # read by HttpGuards (HTTP) and the websocket handshake
    chat = getattr(app.state, "chat", None)
    if chat is None:  # the lifespan never got as far as the chat
        return
    chat.draining = True
    sessions = app.state.sessions
    started = time.monotonic()
    log.info("shutting down: %d answer(s) running, %d websocket(s) open; new work is refused, "
             "running answers get %g s to finish", len(chat.running), len(sessions), timeout)
    await _wait(lambda: not chat.running, timeout, stop_now)
    if chat.running:
        log.warning("cancelling %d answer(s) still running after %g s (SHUTDOWN_TIMEOUT)",
                    len(chat.running), timeout)
        for answer in list(chat.running.values()):
            answer.request.cancel()  # ends with a final event: stored, then `done` is sent
        await _wait(lambda: not chat.running, chat.settings.answer_store_retry_s + CANCEL_GRACE_S,
                    stop_now)
    await asyncio.gather(*(session.close_for_shutdown() for session in list(sessions)))
    log.info("drained in %.1f s; stopping", time.monotonic() - started)


class DrainingServer(uvicorn.Server):
    """uvicorn's server with the drain above on its first SIGTERM / SIGINT, and exit 0."""

    def __init__(self, config: uvicorn.Config, app: FastAPI, timeout: float):
        super().__init__(config)
        self.flywheel_app = app
        self.drain_timeout = timeout

    def handle_exit(self, sig, frame) -> None:
        # A signal handler: no logging here (it could interrupt a log call holding its lock).
        # Not recording the signal keeps uvicorn from re-raising it at exit (exit status 0).
        if self.should_exit:
            self.force_exit = True
        else:
            self.should_exit = True

    async def shutdown(self, sockets=None) -> None:
        await drain(self.flywheel_app, self.drain_timeout, lambda: self.force_exit)
        await super().shutdown(sockets)
