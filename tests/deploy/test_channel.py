"""The LISTEN side: what server processes see when the registry changes or the database
goes away under them."""

from __future__ import annotations

import asyncio

from deploy import registry
from deploy.channel import ServingWatcher, watch_serving
from deploy.state import ServingState

from deploy_testkit import ACTOR, add_base, add_candidate

WAIT_S = 10  # generous: the machine is shared; each wait normally ends in milliseconds


class Recorder:
    """An on_change callback that queues what it is given."""

    def __init__(self) -> None:
        self.states: asyncio.Queue[ServingState] = asyncio.Queue()

    async def __call__(self, state: ServingState) -> None:
        await self.states.put(state)

    async def next(self) -> ServingState:
        return await asyncio.wait_for(self.states.get(), WAIT_S)

    async def until_serving(self, checkpoint_id: str) -> ServingState:
        while True:
            state = await self.next()
            if state.serving and state.serving.id == checkpoint_id:
                return state


async def test_watcher_reads_state_on_connect_and_follows_promotions(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    recorder = Recorder()
    async with ServingWatcher(registry_url, recorder) as watcher:
        first = await recorder.next()
        assert first.serving.id == base.id and watcher.connects == 1

        await asyncio.to_thread(registry.promote, conn, a.id, actor=ACTOR)
        assert (await recorder.next()).serving.id == a.id

        await asyncio.to_thread(registry.canary, conn, base.id, 30, actor=ACTOR)
        state = await recorder.next()
        assert state.canary.id == base.id and state.canary_percent == 30
        assert state.live_versions == (a.id, base.id)


async def test_watcher_reconnects_after_its_backend_is_killed(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    recorder = Recorder()
    watcher = ServingWatcher(registry_url, recorder, min_backoff_s=0.05, max_backoff_s=0.2)
    async with watcher:
        assert (await recorder.next()).serving.id == base.id
        await asyncio.wait_for(watcher.connected.wait(), WAIT_S)
        killed_pid = watcher.backend_pid

        # A database restart as the listener sees it: its server process goes away. The
        # promotion happens while it is gone, so its notification is never delivered to it.
        (terminated,) = conn.execute("SELECT pg_terminate_backend(%s)", (killed_pid,)).fetchone()
        assert terminated
        await asyncio.to_thread(registry.promote, conn, a.id, actor=ACTOR)

        # On reconnecting it reads the state, so it catches up without the notification.
        assert (await recorder.until_serving(a.id)).serving.id == a.id
        assert watcher.connects >= 2 and watcher.backend_pid != killed_pid

        # And it listens again on the new connection.
        await asyncio.to_thread(registry.rollback, conn, actor=ACTOR)
        assert (await recorder.until_serving(base.id)).serving.id == base.id


async def test_a_failing_callback_does_not_stop_the_watcher(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    seen: asyncio.Queue[str] = asyncio.Queue()

    def swap(state: ServingState) -> None:  # a sync callback is accepted too
        seen.put_nowait(state.serving.id)
        if state.serving.id == base.id:
            raise RuntimeError("weights failed to load")

    async with ServingWatcher(registry_url, swap):
        assert await asyncio.wait_for(seen.get(), WAIT_S) == base.id
        await asyncio.to_thread(registry.promote, conn, a.id, actor=ACTOR)
        assert await asyncio.wait_for(seen.get(), WAIT_S) == a.id


async def test_two_replicas_both_hear_one_promotion(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    replicas = [Recorder(), Recorder()]
    async with ServingWatcher(registry_url, replicas[0]), ServingWatcher(registry_url, replicas[1]):
        for replica in replicas:
            await replica.next()
        await asyncio.to_thread(registry.promote, conn, a.id, actor=ACTOR)
        for replica in replicas:
            assert (await replica.next()).serving.id == a.id


async def test_watch_serving_iterates_states(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    states = watch_serving(registry_url)
    try:
        first = await asyncio.wait_for(anext(states), WAIT_S)
        assert first.serving.id == base.id
        await asyncio.to_thread(registry.promote, conn, a.id, actor=ACTOR)
        assert (await asyncio.wait_for(anext(states), WAIT_S)).serving.id == a.id
    finally:
        await states.aclose()


async def test_a_change_without_notification_is_found_by_polling(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    recorder = Recorder()
    async with ServingWatcher(registry_url, recorder, poll_interval_s=0.2):
        await recorder.next()
        # Someone edits the table by hand (no NOTIFY): the poll still notices.
        with conn.transaction():
            conn.execute("UPDATE checkpoints SET status = 'retired' WHERE id = %s", (base.id,))
            conn.execute("UPDATE checkpoints SET status = 'serving' WHERE id = %s", (a.id,))
        assert (await recorder.until_serving(a.id)).serving.id == a.id
