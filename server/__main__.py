"""`python -m server`: serve the app with uvicorn on HOST:PORT (default 127.0.0.1:8000).

SIGTERM (or Ctrl-C) drains before stopping (server/shutdown.py): no new work, running answers
finish for up to SHUTDOWN_TIMEOUT seconds, every stream gets its final frame, exit status 0.
"""

from __future__ import annotations

import sys

from .engine.openmp import tune_for_a_decode_thread

tune_for_a_decode_thread()  # before anything imports torch (see server/engine/openmp.py)

import uvicorn  # noqa: E402 - after the OpenMP settings above

from feedback.logs import configure_logging  # noqa: E402

from .app import create_app  # noqa: E402
from .settings import ServerSettings  # noqa: E402
from .shutdown import DrainingServer  # noqa: E402

STARTUP_FAILURE = 3  # uvicorn's own exit status when the app could not start


def main() -> None:
    configure_logging()
    settings = ServerSettings()
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # The app answers frames over MAX_FRAME_BYTES with an error frame and keeps the
        # connection; only frames past this hard cap make the transport close it (1009).
        ws_max_size=4 * settings.max_frame_bytes,
        log_config=None,  # keep the one logging set-up of configure_logging
        # After the drain every answer has ended; this only bounds the last responses' sends.
        timeout_graceful_shutdown=10,
    )
    server = DrainingServer(config, app, settings.shutdown_timeout)
    server.run()
    if not server.started:
        sys.exit(STARTUP_FAILURE)  # as uvicorn.run does: the lifespan failed (logged)


if __name__ == "__main__":
    main()
