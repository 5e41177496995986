"""The registry's state transitions, their events and notifications, on a real PostgreSQL.

The registry holds global facts (one serving policy, one canary, one pin), so this module
has a database of its own, emptied before each test.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path

import psycopg
import pytest
from support.checkpoints import write_files

from deploy import registry
from deploy.channel import CHANNEL, Notice
from deploy.errors import (
    CheckpointRejected, CheckpointUnusable, InvalidTransition, NotRegistered, NothingToRollBack,
    Pinned,
)

from deploy_testkit import ACTOR, RESET_SQL, add_base, add_candidate, corrupt


def actions(conn, checkpoint_id: str) -> list[str]:
    return [e.action for e in reversed(registry.events(conn, checkpoint_id))]


def serving_id(conn) -> str | None:
    state = registry.read_state(conn)
    return state.serving.id if state.serving else None


# ---------------------------------------------------------------------------------------------


def test_base_registers_once_and_serves_first(conn, tmp_path):
    base = add_base(conn, tmp_path)
    assert base.status == "serving" and base.is_base and base.kind == "full"
    again = registry.register_base(conn, base.path, actor=ACTOR)
    assert again.id == base.id
    assert [c.id for c in registry.list_checkpoints(conn)] == [base.id]
    assert actions(conn, base.id) == ["register", "promote"]


def test_register_reads_the_manifest(conn, tmp_path):
    base = add_base(conn, tmp_path)
    ck = add_candidate(conn, tmp_path, parent=base.id, metrics={"win_rate": 0.61})
    assert ck.status == "candidate" and ck.kind == "lora" and ck.parent_id == base.id
    assert ck.metrics["win_rate"] == 0.61
    assert registry.get(conn, ck.id).path == ck.path
    # The same directory again is harmless (a retried round).
    assert registry.register(conn, ck.path, actor=ACTOR).id == ck.id
    assert actions(conn, ck.id) == ["register"]


def test_a_base_with_a_manifest_is_named_and_verified_by_it(conn, tmp_path):
    # The converted default model is a "full" checkpoint: its manifest id is its version.
    path = write_files(
        tmp_path / "models" / "SmolLM2-135M-Instruct",
        {"config.json": b"{}", "model.safetensors": b"\1" * 64},
        base_model="SmolLM2-135M-Instruct", kind="full",
    )
    base = registry.register_base(conn, path, actor=ACTOR)
    assert base.id == registry.base_checkpoint_id(path) == "SmolLM2-135M-Instruct"
    a = add_candidate(conn, tmp_path, parent=base.id)
    registry.promote(conn, a.id, actor=ACTOR)
    corrupt(path)
    with pytest.raises(CheckpointUnusable, match="does not match"):
        registry.rollback(conn, actor=ACTOR)
    assert serving_id(conn) == a.id


def test_register_needs_the_parent_registered(conn, tmp_path):
    add_base(conn, tmp_path)
    with pytest.raises(NotRegistered, match="register the parent"):
        add_candidate(conn, tmp_path, parent="ck-never-registered")


def test_register_refuses_a_corrupt_directory(conn, tmp_path):
    base = add_base(conn, tmp_path)
    ck_dir = add_candidate(conn, tmp_path, parent=base.id, register=False)
    corrupt(ck_dir)
    with pytest.raises(CheckpointUnusable):
        registry.register(conn, ck_dir, actor=ACTOR)
    assert len(registry.list_checkpoints(conn)) == 1


def test_promote_retires_the_old_and_records_both(conn, tmp_path):
    base = add_base(conn, tmp_path)
    ck = add_candidate(conn, tmp_path, parent=base.id)
    tr = registry.promote(conn, ck.id, actor=ACTOR, reason="gate passed")
    assert tr.changed and tr.previous_id == base.id
    assert serving_id(conn) == ck.id
    assert registry.get(conn, base.id).status == "retired"
    promoted = registry.get(conn, ck.id)
    assert promoted.promoted_by == ACTOR and promoted.reason == "gate passed"
    event = registry.events(conn, ck.id)[0]
    assert (event.action, event.actor, event.reason) == ("promote", ACTOR, "gate passed")
    assert event.details["previous"] == base.id
    assert actions(conn, base.id)[-1] == "retire"
    # Promoting what already serves changes nothing.
    assert not registry.promote(conn, ck.id, actor=ACTOR).changed


def test_at_most_one_serving_even_under_concurrent_promotes(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    ids = [add_candidate(conn, tmp_path, parent=base.id).id for _ in range(6)]
    errors: list[BaseException] = []

    def promote(checkpoint_id: str) -> None:
        try:
            with registry.connect(registry_url) as own:
                registry.promote(own, checkpoint_id, actor=ACTOR)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=promote, args=(i,)) for i in ids]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    statuses = [c.status for c in registry.list_checkpoints(conn)]
    assert statuses.count("serving") == 1
    # Direct SQL cannot make a second one either.
    with pytest.raises(psycopg.errors.UniqueViolation):
        conn.execute("UPDATE checkpoints SET status = 'serving' WHERE status = 'retired'")


def test_promote_refuses_missing_rejected_and_corrupt(conn, tmp_path):
    base = add_base(conn, tmp_path)
    with pytest.raises(NotRegistered) as missing:
        registry.promote(conn, "no-such-checkpoint", actor=ACTOR)
    assert missing.value.exit_code == 3
    bad = add_candidate(conn, tmp_path, parent=base.id)
    registry.reject(conn, bad.id, "reward below serving: 0.41 < 0.50", actor="gate")
    with pytest.raises(CheckpointRejected) as rejected:
        registry.promote(conn, bad.id, actor=ACTOR)
    assert rejected.value.exit_code == 4 and "0.41" in rejected.value.message
    broken = add_candidate(conn, tmp_path, parent=base.id)
    corrupt(Path(broken.path))
    with pytest.raises(CheckpointUnusable):
        registry.promote(conn, broken.id, actor=ACTOR)
    assert serving_id(conn) == base.id
    assert actions(conn, broken.id) == ["register"]  # a refusal writes nothing


def test_rollback_walks_back_through_history(conn, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    b = add_candidate(conn, tmp_path, parent=a.id)
    registry.promote(conn, a.id, actor=ACTOR)
    registry.promote(conn, b.id, actor=ACTOR)

    tr = registry.rollback(conn, actor=ACTOR, reason="thumbs dropped")
    assert (tr.checkpoint_id, tr.previous_id) == (a.id, b.id)
    assert registry.get(conn, b.id).status == "retired"
    assert registry.events(conn, a.id)[0].action == "rollback"
    # A second rollback goes one step further back, not back to b.
    assert registry.rollback(conn, actor=ACTOR).checkpoint_id == base.id
    with pytest.raises(NothingToRollBack):
        registry.rollback(conn, actor=ACTOR)


def test_rollback_skips_rejected_checkpoints(conn, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    b = add_candidate(conn, tmp_path, parent=a.id)
    registry.promote(conn, a.id, actor=ACTOR)
    registry.promote(conn, b.id, actor=ACTOR)
    registry.reject(conn, a.id, "found harmful answers", actor=ACTOR)
    assert registry.rollback(conn, actor=ACTOR).checkpoint_id == base.id


def test_pin_blocks_automatic_promotion_only(conn, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    b = add_candidate(conn, tmp_path, parent=base.id)
    tr = registry.pin(conn, actor=ACTOR, reason="incident 42")
    assert tr.changed and registry.read_state(conn).pinned_id == base.id

    with pytest.raises(Pinned) as refused:
        registry.promote(conn, a.id, actor="retrain", auto=True)
    assert "incident 42" in refused.value.message and "unpin" in refused.value.message
    with pytest.raises(Pinned):
        registry.canary(conn, a.id, 10, actor="retrain", auto=True)
    with pytest.raises(Pinned):
        registry.rollback(conn, actor="retrain", auto=True)
    assert serving_id(conn) == base.id

    # A person may still choose; the pin follows their choice.
    registry.promote(conn, a.id, actor=ACTOR, reason="hotfix")
    assert registry.read_state(conn).pinned_id == a.id
    # pin ID on a non-serving checkpoint serves it and pins it.
    tr = registry.pin(conn, b.id, actor=ACTOR)
    assert tr.details["promoted"] and serving_id(conn) == b.id

    assert registry.unpin(conn, actor=ACTOR, reason="resolved").changed
    assert not registry.unpin(conn, actor=ACTOR).changed
    c = add_candidate(conn, tmp_path, parent=base.id)
    registry.promote(conn, c.id, actor="retrain", auto=True)
    assert serving_id(conn) == c.id
    assert "pin" in actions(conn, base.id) and "unpin" in actions(conn, b.id)


def test_automatic_promotion_takes_only_candidates(conn, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    registry.promote(conn, a.id, actor=ACTOR)
    with pytest.raises(InvalidTransition):
        registry.promote(conn, base.id, actor="retrain", auto=True)  # retired
    registry.promote(conn, base.id, actor=ACTOR)  # a person may


def test_canary_lifecycle(conn, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    b = add_candidate(conn, tmp_path, parent=base.id)

    tr = registry.canary(conn, a.id, 10, actor=ACTOR, reason="try it")
    state = registry.read_state(conn)
    assert tr.changed and state.canary.id == a.id and state.canary_percent == 10
    assert state.serving.id == base.id
    assert registry.canary(conn, a.id, 25, actor=ACTOR).details["previous_percent"] == 10
    assert not registry.canary(conn, a.id, 25, actor=ACTOR).changed
    with pytest.raises(InvalidTransition, match="canary-abort"):
        registry.canary(conn, b.id, 5, actor=ACTOR)
    with pytest.raises(InvalidTransition, match="already serving"):
        registry.canary(conn, base.id, 5, actor=ACTOR)
    with pytest.raises(InvalidTransition):
        registry.canary(conn, a.id, 150, actor=ACTOR)

    assert registry.abort_canary(conn, actor=ACTOR, reason="enough").changed
    assert registry.get(conn, a.id).status == "candidate"
    assert registry.read_state(conn).canary is None
    assert not registry.abort_canary(conn, actor=ACTOR).changed

    # Promoting the canary ends it: it serves everyone.
    registry.canary(conn, b.id, 50, actor=ACTOR)
    registry.promote(conn, b.id, actor=ACTOR)
    state = registry.read_state(conn)
    assert state.serving.id == b.id and state.canary is None
    assert registry.get(conn, b.id).canary_percent is None
    assert actions(conn, b.id) == ["register", "canary", "promote"]

    # Percent 0 aborts; rejecting or retiring a canary ends it too.
    registry.canary(conn, a.id, 5, actor=ACTOR)
    assert registry.canary(conn, a.id, 0, actor=ACTOR).action == "canary_abort"
    registry.canary(conn, a.id, 5, actor=ACTOR)
    registry.reject(conn, a.id, "worse thumbs", actor=ACTOR)
    assert registry.read_state(conn).canary is None


def test_retire_and_reject_rules(conn, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    with pytest.raises(InvalidTransition, match="rollback"):
        registry.retire(conn, base.id, actor=ACTOR)
    with pytest.raises(InvalidTransition, match="roll back"):
        registry.reject(conn, base.id, "bad", actor=ACTOR)
    with pytest.raises(InvalidTransition):
        registry.reject(conn, a.id, "", actor=ACTOR)
    assert registry.retire(conn, a.id, actor=ACTOR, reason="superseded").changed
    assert registry.get(conn, a.id).status == "retired"
    assert not registry.retire(conn, a.id, actor=ACTOR).changed


def test_register_as_rejected_keeps_the_gate_numbers(conn, tmp_path):
    base = add_base(conn, tmp_path)
    ck = add_candidate(conn, tmp_path, parent=base.id, register=False)
    rejected = registry.register(conn, ck, actor="gate", status="rejected",
                                 reason="KL 0.31 over the bound 0.20", metrics={"kl": 0.31})
    assert rejected.status == "rejected" and rejected.metrics["kl"] == 0.31
    assert actions(conn, rejected.id) == ["register", "reject"]


def test_status_reports_serving_canary_pin_and_load_failures(conn, registry_url, tmp_path):
    import asyncio

    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    registry.canary(conn, a.id, 20, actor=ACTOR)
    registry.pin(conn, actor=ACTOR, reason="freeze")

    async def report() -> None:
        async with await psycopg.AsyncConnection.connect(registry_url, autocommit=True) as aconn:
            await registry.record_load_result(aconn, a.id, replica="web-1", ok=False,
                                              error="CUDA out of memory")
            assert (await registry.serving_state(aconn)) == registry.read_state(conn)

    asyncio.run(report())
    st = registry.status(conn)
    assert st.serving.id == base.id and st.canary.id == a.id
    assert st.state.pinned_id == base.id and st.pin_reason == "freeze"
    assert [e.actor for e in st.load_failures] == ["web-1"]
    doc = st.to_json()
    json.dumps(doc)
    assert doc["pinned"]["by"] == ACTOR and doc["canary_percent"] == 20


# ---------------------------------------------------------------------------------------------
# Notifications.


def _listen(url: str) -> psycopg.Connection:
    listener = psycopg.connect(url, autocommit=True)
    listener.execute(f"LISTEN {CHANNEL}")
    return listener


def _drain(listener: psycopg.Connection) -> list[Notice]:
    return [Notice.parse(n.payload) for n in listener.notifies(timeout=0.3)]


def test_each_change_sends_exactly_one_notification(conn, registry_url, tmp_path):
    base = add_base(conn, tmp_path)
    a = add_candidate(conn, tmp_path, parent=base.id)
    b = add_candidate(conn, tmp_path, parent=base.id)
    with _listen(registry_url) as listener:
        registry.promote(conn, a.id, actor=ACTOR)
        [notice] = _drain(listener)
        assert (notice.event, notice.checkpoint_id, notice.serving_id) == ("promote", a.id, a.id)
        assert notice.actor == ACTOR

        registry.canary(conn, b.id, 10, actor=ACTOR)
        [notice] = _drain(listener)
        assert (notice.event, notice.canary_id, notice.canary_percent) == ("canary", b.id, 10)

        registry.rollback(conn, actor=ACTOR)
        [notice] = _drain(listener)
        assert (notice.event, notice.serving_id, notice.canary_id) == ("rollback", base.id, b.id)

        registry.pin(conn, a.id, actor=ACTOR)  # promote + pin: still one notification
        [notice] = _drain(listener)
        assert (notice.event, notice.serving_id, notice.pinned_id) == ("pin", a.id, a.id)

        # No change, or a refused change: no notification.
        registry.promote(conn, a.id, actor=ACTOR)
        with pytest.raises(Pinned):
            registry.promote(conn, base.id, actor="retrain", auto=True)
        registry.retire(conn, base.id, actor=ACTOR)  # already retired
        assert _drain(listener) == []


def test_notification_waits_for_the_callers_transaction(registry_url, tmp_path):
    with psycopg.connect(registry_url) as conn:  # not autocommit: the caller's transaction
        conn.execute(RESET_SQL)
        conn.commit()
        base = add_base(conn, tmp_path)
        conn.commit()
        a = add_candidate(conn, tmp_path, parent=base.id)
        conn.commit()
        with _listen(registry_url) as listener:
            registry.promote(conn, a.id, actor=ACTOR)
            assert _drain(listener) == []  # not yet committed
            conn.rollback()
            assert _drain(listener) == [] and serving_id(conn) == base.id
            registry.promote(conn, a.id, actor=ACTOR)
            conn.commit()
            assert [n.serving_id for n in _drain(listener)] == [a.id]
