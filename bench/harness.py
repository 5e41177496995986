"""What the end-to-end benchmarks share: the database server to work on, a free port, the real
processes (`python -m server`, `python -m retrain serve`) and waiting for a server to be ready.
Each benchmark works in a database of its own: `support.database.scratch_database`.

What the benchmarks share with the tests lives in tests/support (a scratch database, the
websocket load generator): importing this module puts tests/ on the path, after the project
root, so `support.*` is the one copy both use. bench/ and tests/ are dev tools beside the
product; neither is installed or copied into the image."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "tests") not in sys.path:
    sys.path.append(str(ROOT / "tests"))


def admin_url(database_url: str | None, workdir: Path) -> str:
    """`database_url`, or a private embedded PostgreSQL under `workdir` (stopped at exit)."""
    if database_url:
        return database_url
    from feedback.db import embedded_url

    return embedded_url(workdir)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_until_terminated(coro):
    """asyncio.run(coro), where SIGTERM (a `kill`, a CI timeout) cancels it as Ctrl-C does: the
    benchmark's finally blocks then stop the servers and services it started and drop its
    scratch database, instead of leaving them running on the machine; the process then exits
    143, as a SIGTERM-killed one would."""
    terminated = False

    async def main():
        task = asyncio.current_task()
        loop = asyncio.get_running_loop()

        def cancel() -> None:
            nonlocal terminated
            terminated = True
            task.cancel()

        loop.add_signal_handler(signal.SIGTERM, cancel)
        try:
            return await coro
        finally:
            loop.remove_signal_handler(signal.SIGTERM)

    try:
        return asyncio.run(main())
    except asyncio.CancelledError:
        if terminated:
            print("terminated (SIGTERM): stopped what the benchmark had started", file=sys.stderr)
            raise SystemExit(128 + signal.SIGTERM) from None
        raise


def start_process(module: str, args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """`python -m module args` from the project root with `env` over this process's, its output
    to `log_path`."""
    log_file = open(log_path, "w")
    return subprocess.Popen([sys.executable, "-m", module, *args], cwd=ROOT, env={**os.environ, **env},
                            stdout=log_file, stderr=subprocess.STDOUT)


def stop_process(process: subprocess.Popen, timeout: float = 30) -> None:
    """SIGINT (a clean shutdown), then kill if it does not end in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


async def version_info(client) -> dict:
    response = await client.get("/api/version")
    response.raise_for_status()
    return response.json()


async def wait_ready(client, process: subprocess.Popen, timeout: float) -> dict:
    """GET /api/version until the server serves a version, in sync with the registry."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited with {process.returncode}; see its log")
        try:
            info = await version_info(client)
            if info["model_version"] and info["in_sync"] and info["listening"]:
                return info
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.25)
    raise SystemExit(f"the server was not ready after {timeout:g} s")


class OwnedPostgres:
    """A PostgreSQL of our own (pgserver's binaries, a Unix socket only) that a fault scenario
    may stop and start again: never the machine's shared server. Its data lives in a fresh
    directory of the system's temp dir, not under pytest's (pytest resets the permissions of its
    base directory when any session starts, which would lock out the `pgserver` user pgserver
    runs PostgreSQL as under root)."""

    def __init__(self):
        import tempfile

        import pgserver

        self.root = Path(tempfile.mkdtemp(prefix="flywheel-owned-pg-"))
        self.pgdata = self.root / "pg"
        self._server = pgserver.get_server(self.pgdata, cleanup_mode="stop")
        self.url = self._server.get_uri()
        self._socket_dir = self._server.get_postmaster_info().socket_dir

    def _pg_ctl(self, args: list[str]) -> None:
        import pgserver

        pgserver.pg_ctl(args, pgdata=self.pgdata, user=self._server.system_user, timeout=60)

    def stop(self) -> None:
        """Stop it as an operator or a crash-restart would: fast mode ends every session now."""
        self._pg_ctl(["-w", "-m", "fast", "stop"])

    def start(self) -> None:
        """Start it again, on the same socket and data."""
        self._pg_ctl(["-w", "-o", '-h ""', "-o", f"-k {self._socket_dir}",
                      "-l", str(self.pgdata / "log"), "start"])

    def close(self) -> None:
        """Stopped for good, its data removed."""
        import shutil

        self._server.cleanup()
        shutil.rmtree(self.root, ignore_errors=True)
