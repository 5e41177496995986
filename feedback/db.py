"""Where the database is: an external PostgreSQL (`DATABASE_URL`) or an embedded one.

With no `DATABASE_URL`, a private PostgreSQL is started with `pgserver` in `DATA_DIR/pg`.
pgserver keeps one server per data directory and counts the processes using it, so commands
sharing a `DATA_DIR` share one server (a running one is reused); it stops when the last of
them exits, and the data stays on disk for the next start.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path

import psycopg

from .settings import StoreSettings

log = logging.getLogger(__name__)

_embedded: dict[Path, object] = {}  # data dir -> pgserver handle, kept alive for the process
_embedded_lock = threading.Lock()


def embedded_url(data_dir: Path) -> str:
    """Start (or join) the embedded PostgreSQL under `data_dir` and return its URL."""
    pgdata = (Path(data_dir) / "pg").resolve()
    with _embedded_lock:
        server = _embedded.get(pgdata)
        if server is None:
            import pgserver  # imported lazily: only the embedded path needs it

            pgdata.parent.mkdir(parents=True, exist_ok=True)
            log.info("starting embedded PostgreSQL in %s", pgdata)
            server = pgserver.get_server(pgdata, cleanup_mode="stop")
            _embedded[pgdata] = server
        return server.get_uri()


def database_url(settings: StoreSettings) -> str:
    """The URL every connection of this process uses."""
    if settings.database_url:
        return settings.database_url
    return embedded_url(settings.data_dir)


def connect(url: str, **kwargs) -> psycopg.Connection:
    return psycopg.connect(url, **kwargs)
