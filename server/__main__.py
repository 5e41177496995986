"""`python -m server`: serve the app with uvicorn on HOST:PORT (default 127.0.0.1:8000)."""

from __future__ import annotations

import uvicorn

from feedback.logs import configure_logging

from .app import create_app
from .settings import ServerSettings


def main() -> None:
    configure_logging()
    settings = ServerSettings()
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        # The app answers frames over MAX_FRAME_BYTES with an error frame and keeps the
        # connection; only frames past this hard cap make the transport close it (1009).
        ws_max_size=4 * settings.max_frame_bytes,
        log_config=None,  # keep the one logging set-up of configure_logging
        timeout_graceful_shutdown=10,
    )


if __name__ == "__main__":
    main()
