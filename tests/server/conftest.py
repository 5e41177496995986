"""Fixtures for the server's tests: the app on a real uvicorn server, the tiny-model engine, the
real PostgreSQL of this run (db_url), fresh users, and two real remote engines (blue, green).

Servers run inside the test session's event loop (uvicorn.Server.serve as a task), so the
engine, the app, the websocket/HTTP clients and the browser driver share one loop and nothing
crosses threads. Tests isolate themselves by using fresh tokens: a new token is a new user.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import psycopg
import pytest
from psycopg.rows import dict_row

from remote_testkit import ServeLaunch, ServeProcess, blue_and_green
from server.engine.local import LocalEngine, LocalEngineConfig, start_local_engine
from server_testkit import make_settings, new_token, serve
from swap_testkit import new_engine
from support.tiny_model import tiny_model_dir  # noqa: F401 - the fixture, registered here


@pytest.fixture(scope="session")
async def engine(tiny_model_dir) -> AsyncIterator[LocalEngine]:
    """The local engine on the tiny model (SmolLM2's real tokenizer and chat template), shared
    by every server test; each test's servers use it as is and leave it running."""
    # One torch thread: on a shared, busy machine torch's default (one per core) spins and runs
    # the tiny model ten times slower.
    config = LocalEngineConfig(max_batch_size=16, context_length=1024, seed=0, threads=1)
    engine = await start_local_engine(tiny_model_dir, config)
    yield engine
    await engine.close()


@pytest.fixture(scope="session")
async def base_url(db_url, engine, tmp_path_factory) -> AsyncIterator[str]:
    """One server for most tests, with generous limits (tests that need tight ones start their
    own with `serve`)."""
    settings = make_settings(db_url, tmp_path_factory.mktemp("server"))
    async with serve(settings, engine) as url:
        yield url


@pytest.fixture
async def swap_engine(tiny_model_dir) -> AsyncIterator[LocalEngine]:  # noqa: F811
    """A local engine of the test's own, for tests that swap its versions (swap_testkit)."""
    engine = await new_engine(tiny_model_dir)
    yield engine
    await engine.close()


@pytest.fixture
def token() -> str:
    """A fresh user."""
    return new_token()


@pytest.fixture
async def db(db_url) -> AsyncIterator[psycopg.AsyncConnection]:
    """A connection for checking rows (dicts), autocommit so every read sees the latest."""
    async with await psycopg.AsyncConnection.connect(
        db_url, autocommit=True, row_factory=dict_row
    ) as conn:
        yield conn



# Remote engines: two real `transformers serve` processes per test module that asks for them
# (remote_testkit.py), started together; each test waits for the ones it uses.


@pytest.fixture(scope="module")
def remote_servers(tiny_model_dir, tmp_path_factory) -> Iterator[dict[str, ServeLaunch]]:  # noqa: F811
    with blue_and_green(tiny_model_dir, tmp_path_factory) as launches:
        yield launches


@pytest.fixture(scope="module")
def blue(remote_servers) -> ServeProcess:
    return remote_servers["blue"].wait_ready()


@pytest.fixture(scope="module")
def green(remote_servers) -> ServeProcess:
    return remote_servers["green"].wait_ready()
