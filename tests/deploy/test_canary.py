"""Canary: the split of new conversations, its stickiness, Wilson intervals and the decision."""

from __future__ import annotations

import math
import os
import uuid
from datetime import datetime, timedelta

import psycopg
import pytest

from deploy import canary, registry
from deploy.state import PolicyRef, ServingState

from deploy_testkit import ACTOR, fake_model_dir


def _ref(checkpoint_id: str) -> PolicyRef:
    return PolicyRef(checkpoint_id, f"/ck/{checkpoint_id}", "TinyBase", "lora", None)


def _state(percent: float | None, canary_id: str = "ck-canary") -> ServingState:
    return ServingState(_ref("ck-serving"), _ref(canary_id) if percent else None, percent)


IDS = [uuid.UUID(int=i * 7919 + 12345) for i in range(20_000)]  # fixed, so the test is exact


@pytest.mark.parametrize("percent", [1, 10, 50, 90])
def test_split_follows_the_percent(percent):
    state = _state(percent)
    share = sum(canary.choose_version(i, state) == "ck-canary" for i in IDS) / len(IDS)
    # Binomial standard deviation at n=20000 is at most 0.35 points; allow 4 of them.
    assert abs(share * 100 - percent) < 4 * math.sqrt(percent * (100 - percent) / len(IDS)) + 0.1


def test_choice_is_sticky_and_raising_the_percent_only_adds():
    at_10 = {i for i in IDS[:5000] if canary.choose_version(i, _state(10)) == "ck-canary"}
    assert at_10 == {i for i in IDS[:5000] if canary.choose_version(str(i), _state(10)) == "ck-canary"}
    at_30 = {i for i in IDS[:5000] if canary.choose_version(i, _state(30)) == "ck-canary"}
    assert at_10 < at_30
    # No canary: everyone gets the serving policy.
    assert {canary.choose_version(i, _state(None)) for i in IDS[:100]} == {"ck-serving"}


def test_each_canary_draws_its_own_conversations():
    first = {i for i in IDS if canary.choose_version(i, _state(20, "ck-a")) == "ck-a"}
    second = {i for i in IDS if canary.choose_version(i, _state(20, "ck-b")) == "ck-b"}
    overlap = len(first & second) / len(IDS)
    assert abs(overlap - 0.04) < 0.01  # independent draws: 20% of 20%


def test_an_assigned_version_is_kept_while_live():
    state = _state(10)
    outside = next(i for i in IDS if canary.choose_version(i, state) == "ck-serving")
    assert canary.choose_version(outside, state, assigned="ck-canary") == "ck-canary"
    assert canary.choose_version(outside, state, assigned="ck-retired") == "ck-serving"


def test_nothing_serving_is_an_error():
    with pytest.raises(canary.NoServingPolicy):
        canary.choose_version(IDS[0], ServingState(None))


@pytest.mark.parametrize(
    "up, total, low, high",
    [
        # Hand-computed with z = 1.959964: centre = (p + z²/2n) / (1 + z²/n),
        # half = z * sqrt(p(1-p)/n + z²/4n²) / (1 + z²/n).
        (8, 10, 0.490162, 0.943318),
        (0, 10, 0.0, 0.277533),
        (10, 10, 0.722467, 1.0),
        (50, 100, 0.403832, 0.596168),
        (1, 1, 0.206549, 1.0),
    ],
)
def test_wilson_interval_matches_hand_computed_values(up, total, low, high):
    got_low, got_high = canary.wilson_interval(up, total, 0.95)
    assert got_low == pytest.approx(low, abs=1e-5)
    assert got_high == pytest.approx(high, abs=1e-5)


def test_wilson_interval_edges():
    assert canary.wilson_interval(0, 0) == (0.0, 1.0)
    assert canary.z_for(0.95) == pytest.approx(1.959964, abs=1e-6)
    narrow = canary.wilson_interval(400, 1000, 0.90)
    wide = canary.wilson_interval(400, 1000, 0.99)
    assert wide[0] < narrow[0] < 0.4 < narrow[1] < wide[1]
    with pytest.raises(ValueError):
        canary.wilson_interval(11, 10)


# ---------------------------------------------------------------------------------------------
# The report, on ratings in a real database.


@pytest.fixture
def running_canary(conn, tmp_path) -> tuple[str, str]:
    """(serving id, canary id): two model directories, the second in a 10% canary."""
    serving = registry.register_base(conn, fake_model_dir(tmp_path, "Serving"), actor=ACTOR)
    candidate = registry.register_base(conn, fake_model_dir(tmp_path, "Candidate"), actor=ACTOR)
    registry.canary(conn, candidate.id, 10, actor=ACTOR)
    return serving.id, candidate.id


def seed_thumbs(conn, version: str, up: int, down: int, written_at: datetime | None = None) -> None:
    """`up + down` assistant answers by `version`, rated by one user."""
    conn.execute(
        """WITH u AS (INSERT INTO users (token_hash) VALUES (%(hash)s) RETURNING id),
                c AS (INSERT INTO conversations (user_id) SELECT id FROM u RETURNING id),
                m AS (INSERT INTO messages (conversation_id, role, content, model_version, created_at)
                      SELECT c.id, 'assistant', 'answer ' || g, %(version)s,
                             coalesce(%(at)s, clock_timestamp())
                      FROM c, generate_series(1, %(n)s) g
                      RETURNING id)
           INSERT INTO ratings (message_id, user_id, rating)
           SELECT m.id, (SELECT id FROM u),
                  CASE WHEN row_number() OVER () <= %(up)s THEN 1 ELSE -1 END
           FROM m""",
        {"hash": os.urandom(32), "version": version, "at": written_at, "n": up + down, "up": up},
    )


def test_report_without_a_canary(conn, tmp_path):
    registry.register_base(conn, fake_model_dir(tmp_path), actor=ACTOR)
    report = canary.canary_report(conn)
    assert report.decision == "no_canary" and "canary ID PERCENT" in report.explanation


def test_report_counts_thumbs_since_the_canary_started(conn, running_canary):
    serving, candidate = running_canary
    seed_thumbs(conn, serving, up=90, down=10, written_at=datetime.now().astimezone() - timedelta(days=1))
    seed_thumbs(conn, serving, up=12, down=8)
    seed_thumbs(conn, candidate, up=5, down=5)
    report = canary.canary_report(conn, min_ratings=30)
    by_role = {v.role: v for v in report.versions}
    assert (by_role["serving"].up, by_role["serving"].down) == (12, 8)  # yesterday's left out
    assert (by_role["canary"].up, by_role["canary"].down) == (5, 5)
    assert (by_role["canary"].low, by_role["canary"].high) == pytest.approx(canary.wilson_interval(5, 10))
    assert report.decision == "continue" and "not enough" in report.explanation


def test_a_decisively_better_canary_is_promoted(conn, running_canary):
    serving, candidate = running_canary
    seed_thumbs(conn, serving, up=40, down=60)
    seed_thumbs(conn, candidate, up=80, down=20)
    report = canary.canary_decide(conn, actor="canary-bot", min_ratings=30, apply=False)
    assert report.decision == "promote" and report.action_taken is None
    assert registry.read_state(conn).serving.id == serving

    report = canary.canary_decide(conn, actor="canary-bot", min_ratings=30)
    assert report.action_taken == f"promoted {candidate}"
    assert registry.read_state(conn).serving.id == candidate
    event = registry.events(conn, candidate)[0]
    assert event.action == "promote" and event.details["auto"] and "80.0%" in event.reason


def test_a_pinned_registry_is_not_promoted_by_the_canary(conn, running_canary):
    serving, candidate = running_canary
    registry.pin(conn, actor=ACTOR, reason="release freeze")
    seed_thumbs(conn, serving, up=40, down=60)
    seed_thumbs(conn, candidate, up=80, down=20)
    report = canary.canary_decide(conn, actor="canary-bot", min_ratings=30)
    assert report.decision == "promote" and "release freeze" in report.action_taken
    assert registry.read_state(conn).serving.id == serving


def test_a_decisively_worse_canary_is_aborted_and_rejected(conn, running_canary):
    serving, candidate = running_canary
    seed_thumbs(conn, serving, up=70, down=30)
    seed_thumbs(conn, candidate, up=30, down=70)
    report = canary.canary_decide(conn, actor="canary-bot", min_ratings=30)
    assert report.decision == "abort"
    state = registry.read_state(conn)
    assert state.canary is None and state.serving.id == serving
    assert registry.get(conn, candidate).status == "rejected"


def test_overlapping_intervals_decide_nothing(conn, running_canary):
    serving, candidate = running_canary
    seed_thumbs(conn, serving, up=30, down=20)
    seed_thumbs(conn, candidate, up=33, down=17)
    report = canary.canary_decide(conn, actor="canary-bot", min_ratings=30)
    assert report.decision == "continue" and "overlap" in report.explanation
    assert registry.read_state(conn).canary.id == candidate


async def test_sticky_version_remembers_the_choice(conn, registry_url, running_canary):
    serving, candidate = running_canary
    (conversation_id,) = conn.execute(
        """WITH u AS (INSERT INTO users (token_hash) VALUES (%s) RETURNING id)
           INSERT INTO conversations (user_id) SELECT id FROM u RETURNING id""",
        (os.urandom(32),),
    ).fetchone()
    state = registry.read_state(conn)
    async with await psycopg.AsyncConnection.connect(registry_url, autocommit=True) as aconn:
        first = await canary.sticky_version(aconn, conversation_id, state)
        assert first == canary.choose_version(conversation_id, state)
        # The canary grows to 100% or shrinks to a sliver: the conversation keeps its version.
        for percent in (100, 0.01):
            moved = ServingState(state.serving, state.canary, percent)
            assert await canary.sticky_version(aconn, conversation_id, moved) == first
        # The canary is over: the conversation moves to what serves.
        assert await canary.sticky_version(aconn, conversation_id, ServingState(state.serving)) == serving
    (stored,) = conn.execute(
        "SELECT model_version FROM conversations WHERE id = %s", (conversation_id,)
    ).fetchone()
    assert stored == serving
