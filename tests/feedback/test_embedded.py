"""The embedded PostgreSQL (no DATABASE_URL): starts under DATA_DIR, is shared by a second
process, and keeps its data across a restart."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Each child process resolves the database exactly as a Flywheel command does.
_CHILD = textwrap.dedent(
    """
    import sys, psycopg
    from feedback.db import database_url
    from feedback.migrate import migrate
    from feedback.settings import StoreSettings
    url = database_url(StoreSettings())
    migrate(url)
    with psycopg.connect(url, autocommit=True) as conn:
        if sys.argv[1] == "write":
            conn.execute("INSERT INTO users (token_hash, name) VALUES (sha256('t'::bytea), 'kept')")
        names = [r[0] for r in conn.execute("SELECT name FROM users ORDER BY id")]
    # The first line of postmaster.pid is the server's process id: equal ids, one server.
    postmaster = (StoreSettings().data_dir / "pg" / "postmaster.pid").read_text().split()[0]
    print(postmaster, ",".join(names), flush=True)
    if sys.argv[2] == "hold":
        sys.stdin.readline()  # keep the server in use until the test says so
    """
)


def _start(data_dir: Path, mode: str, hold: str) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DATA_DIR"] = str(data_dir)
    return subprocess.Popen(
        [sys.executable, "-c", _CHILD, mode, hold],
        cwd=ROOT, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )


def test_embedded_postgres_is_shared_and_survives_restart(tmp_path):
    first = _start(tmp_path, "write", "hold")
    first_postmaster, names = first.stdout.readline().split()
    assert names == "kept"

    # A second process on the same DATA_DIR joins the running server, not a new one.
    second = _start(tmp_path, "read", "exit")
    out, _ = second.communicate(timeout=120)
    second_postmaster, names = out.split()
    assert second_postmaster == first_postmaster
    assert names == "kept"

    first.communicate(input="\n", timeout=120)
    assert first.returncode == 0
    # The last user gone, the server stopped...
    assert not (tmp_path / "pg" / "postmaster.pid").exists()

    # ...and a restart finds the data where it was left.
    third = _start(tmp_path, "read", "exit")
    out, _ = third.communicate(timeout=120)
    _, names = out.split()
    assert names == "kept"
    assert third.returncode == 0
