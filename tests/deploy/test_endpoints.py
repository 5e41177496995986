"""Blue/green requests for remote engines (deploy/endpoints.py) on a real PostgreSQL: who asked
for which URL, which replica uses which, the NOTIFY servers hear, and replicas' outcomes."""

from __future__ import annotations

import asyncio

import psycopg
import pytest

from deploy import endpoints, registry
from deploy.channel import CHANNEL, Notice, ServingWatcher

from deploy_testkit import ACTOR, add_base

BLUE, GREEN = "http://engine-blue:8000", "http://engine-green:8000/v1"


def test_nothing_asked_for_leaves_every_replica_on_its_engine_url(conn):
    state = registry.read_state(conn)
    assert state.engine_endpoints == () and state.engine_endpoint("a:8000") is None
    assert state.to_json()["engine_endpoints"] == []


def test_the_newest_request_for_a_replica_or_for_all_wins(conn):
    every, _ = endpoints.request_switch(conn, GREEN, actor=ACTOR, reason="green has the new weights")
    assert (every.url, every.replica, every.actor, every.reason) == (GREEN, None, ACTOR, "green has the new weights")
    one, state = endpoints.request_switch(conn, BLUE, actor="bob", replica="a:8000", reason="compare")
    assert state.engine_endpoint("a:8000") == one and state.engine_endpoint("b:8000") == every
    assert state.engine_endpoints == (every, one)

    # Moving every replica again overrides the one moved alone.
    again, state = endpoints.request_switch(conn, GREEN, actor=ACTOR)
    assert again.id > one.id
    assert state.engine_endpoint("a:8000") == again and state.engine_endpoints == (again,)
    assert registry.read_state(conn) == state


def test_a_request_is_one_notification_with_the_url(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    with psycopg.connect(registry_url, autocommit=True) as listener:
        listener.execute(f"LISTEN {CHANNEL}")
        request, _ = endpoints.request_switch(conn, GREEN, actor=ACTOR, replica="a:8000")
        raw = [n.payload for n in listener.notifies(timeout=0.3)]
    assert len(raw) == 1
    notice = Notice.parse(raw[0])
    assert (notice.event, notice.checkpoint_id, notice.actor) == ("engine_url", base.id, ACTOR)
    assert f'"engine_url":"{GREEN}"' in raw[0] and f'"request_id":{request.id}' in raw[0]


@pytest.mark.parametrize("url", ["engine:8000", "ftp://engine:8000", "http://", "http://engine:port", " "])
def test_a_url_that_is_not_an_engines_is_refused(conn, url):
    with pytest.raises(endpoints.InvalidEngineUrl, match="http"):
        endpoints.request_switch(conn, url, actor=ACTOR)
    assert registry.read_state(conn).engine_endpoints == ()


async def test_outcomes_are_each_replicas_latest_for_the_requests_in_force(conn, registry_url):
    old, _ = endpoints.request_switch(conn, BLUE, actor=ACTOR)
    request, state = endpoints.request_switch(conn, GREEN, actor=ACTOR)
    async with await psycopg.AsyncConnection.connect(registry_url, autocommit=True) as aconn:
        await endpoints.record_outcome(aconn, old, replica="a:8000", ok=True)
        await endpoints.record_outcome(aconn, request, replica="a:8000", ok=False, error="it did not answer")
        await endpoints.record_outcome(aconn, request, replica="a:8000", ok=True, details={"switched": True})
        await endpoints.record_outcome(aconn, request, replica="b:8000", ok=False, error="no adapter")
    found = {(e.replica, e.action, e.reason) for e in endpoints.outcomes(conn, state)}
    assert found == {("a:8000", "switched", None), ("b:8000", "switch_failed", "no adapter")}
    history = endpoints.events(conn)
    assert [e.action for e in history][:2] == ["switch_failed", "switched"]
    assert history[-1].action == "switch" and history[-1].url == BLUE


async def test_a_watching_replica_hears_the_request(conn, registry_url, tmp_path):
    add_base(conn, tmp_path)
    heard: asyncio.Queue = asyncio.Queue()
    async with ServingWatcher(registry_url, heard.put):
        first = await asyncio.wait_for(heard.get(), 10)
        assert first.engine_endpoint("a:8000") is None
        request, _ = await asyncio.to_thread(endpoints.request_switch, conn, GREEN, actor=ACTOR)
        state = await asyncio.wait_for(heard.get(), 10)
    assert state.engine_endpoint("a:8000") == request
