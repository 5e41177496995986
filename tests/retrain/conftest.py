"""Fixtures for rounds: a database of each test's own, a store seeded with feedback, settings
that make a round on the tiny model take seconds."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from dataclasses import dataclass, field

import psycopg
import pytest
from support.tiny_model import tiny_model_dir  # noqa: F401  (the session fixture)
from support.database import scratch_database

from feedback import store
from retrain.settings import RetrainSettings

SERVING = "base-tiny"  # the model_version the seeded answers record


@pytest.fixture
def round_db(admin_url) -> Iterator[str]:
    """A migrated database for one test: a round reads every row, and registers checkpoints."""
    with scratch_database(admin_url, "flywheel_round") as url:
        yield url


@dataclass
class Seeded:
    """What `seed` wrote, by kind, so tests can check the adapter's counts against it."""

    prompts: list[str] = field(default_factory=list)  # user turns of usable conversations
    private_prompts: list[str] = field(default_factory=list)  # user turns of opted-out ones
    comparisons: int = 0
    thumbs: int = 0  # thumbed answers (compared or not: each is a pointwise label)


def seed(url: str, conversations: int, *, private: int = 0, user_token: str = "seed-user") -> Seeded:
    """`conversations` chats, each: a question with two answers (compared: the polite one wins,
    and thumbed), then a follow-up with one thumbed answer. `private` more chats, the same shape,
    with allow_data_use off."""
    return asyncio.run(_seed(url, conversations, private, user_token))


async def _seed(url: str, conversations: int, private: int, user_token: str) -> Seeded:
    seeded = Seeded()
    async with await psycopg.AsyncConnection.connect(url) as conn:
        user = await store.user_for_token(conn, user_token)
        for n in range(conversations + private):
            usable = n < conversations
            chat = await store.create_conversation(conn, user, f"chat {n}", allow_data_use=usable)

            async def say(parent, role, text):
                version = SERVING if role == "assistant" else None
                return await store.add_message(conn, user, chat.id, parent, role, text, model_version=version)

            question = f"Question number {n}: how do I water plant {n}?"
            follow_up = f"And how often for plant {n}?"
            q = await say(None, "user", question)
            polite = await say(q.id, "assistant", f"Please water plant {n} gently, thank you.")
            curt = await say(q.id, "assistant", f"Water it. {n}")
            await store.record_comparison(conn, user, polite.id, curt.id, "better")
            await store.record_rating(conn, user, polite.id, 1)
            q2 = await say(polite.id, "user", follow_up)
            answer = await say(q2.id, "assistant", f"Please water it weekly, plant {n} thanks you.")
            await store.record_rating(conn, user, answer.id, 1 if n % 2 else -1)
            (seeded.prompts if usable else seeded.private_prompts).extend([question, follow_up])
            if usable:
                seeded.comparisons += 1
                seeded.thumbs += 2
    return seeded


@pytest.fixture
def seed_store():
    """`seed(url, conversations, private=0)`: write feedback into a store (see `seed`)."""
    return seed


@pytest.fixture
def round_settings(round_db, tiny_model_dir, tmp_path) -> RetrainSettings:
    """Budgets small enough for seconds on the tiny model; everything else the defaults."""
    return RetrainSettings(
        data_dir=tmp_path / "data",
        database_url=round_db,
        model=str(tiny_model_dir),
        retrain_held_out_percent=50,
        retrain_min_pairs=2,
        retrain_min_prompts=2,
        retrain_max_prompts=16,
        retrain_max_gate_prompts=4,
        retrain_ppo_iterations=1,
        retrain_ppo_batch_size=4,
        retrain_max_new_tokens=6,
        retrain_reward_epochs=1,
        retrain_reward_max_tokens=96,
        retrain_config_file=None,
    )
