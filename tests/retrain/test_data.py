"""A round's data: the store's reads split by prompt, merged per prompt, counted, traceable."""

from __future__ import annotations

import asyncio

import psycopg

from feedback import store
from retrain.data import prompt_key, read_round_data, too_little
from retrain.reward_data import is_held_out

SERVING = "base-tiny"


def _read(url, held_out=50.0, max_ppo=1000, max_gate=1000):
    return read_round_data(url, held_out_percent=held_out, max_ppo_prompts=max_ppo, max_gate_prompts=max_gate)


def _texts(data) -> dict[str, set[str]]:
    """Every piece of text each part of the round would see."""
    seen = {"ppo": set(), "gate": set(), "reward_train": set(), "reward_held_out": set()}
    for p in data.ppo_prompts:
        seen["ppo"] |= {t["content"] for t in p.messages}
    for p in data.gate_prompts:
        seen["gate"] |= {t["content"] for t in p.messages}
    for name, part in (("reward_train", data.reward_train), ("reward_held_out", data.reward_held_out)):
        for g in part.groups:
            seen[name] |= {t["content"] for t in g.prompt} | {x for pair in g.pairs for x in (pair.chosen, pair.rejected)}
        for t in part.thumbs:
            seen[name] |= {turn["content"] for turn in t.prompt} | {t.answer}
    return seen


def test_held_out_prompts_never_reach_ppo_or_reward_training(round_db, seed_store):
    seeded = seed_store(round_db, 12)
    data = _read(round_db)

    ppo = {prompt_key(p.messages) for p in data.ppo_prompts}
    gate = {prompt_key(p.messages) for p in data.gate_prompts}
    assert ppo and gate, "50% held out of 24 prompts: both sides have some"
    assert not ppo & gate
    assert all(is_held_out(p.messages, 50.0) for p in data.gate_prompts)
    assert not any(is_held_out(p.messages, 50.0) for p in data.ppo_prompts)
    # The reward model's split is the same split: held-out prompts only measure its accuracy.
    assert all(is_held_out(g.prompt, 50.0) for g in data.reward_held_out.groups)
    assert not any(is_held_out(g.prompt, 50.0) for g in data.reward_train.groups)
    assert all(is_held_out(t.prompt, 50.0) for t in data.reward_held_out.thumbs)
    assert not any(is_held_out(t.prompt, 50.0) for t in data.reward_train.thumbs)
    # Every user turn of the store is on exactly one side.
    assert sorted(p.messages[-1]["content"] for p in [*data.ppo_prompts, *data.gate_prompts]) == sorted(seeded.prompts)


def test_the_split_is_stable_between_rounds(round_db, seed_store):
    seed_store(round_db, 6)
    first, second = _read(round_db), _read(round_db)
    assert [p.message_id for p in first.gate_prompts] == [p.message_id for p in second.gate_prompts]
    assert first.fingerprint() == second.fingerprint()


def test_opted_out_conversations_are_never_read(round_db, seed_store):
    seeded = seed_store(round_db, 4, private=3)
    data = _read(round_db)
    seen = set().union(*_texts(data).values())
    assert not seen & set(seeded.private_prompts)
    assert not any(f"plant {n}" in text for n in (4, 5, 6) for text in seen)  # the private chats' answers
    assert data.counts["prompts_read"] == len(seeded.prompts) == 8


def test_counts_match_what_was_seeded(round_db, seed_store):
    seeded = seed_store(round_db, 10)
    data = _read(round_db)
    c = data.counts
    assert c["comparison_pairs"] == seeded.comparisons == 10
    assert c["thumb_pairs"] == 0
    # Every thumb is a pointwise label: the compared answers' as well as the follow-ups'.
    assert c["thumbs"] == seeded.thumbs == 20
    assert c["reward_pairs"] + c["held_out_pairs"] == 10
    assert c["reward_thumbs"] + c["held_out_thumbs"] == 20
    assert c["comparison_ties"] == c["reward_ties"] + c["held_out_ties"] == 0
    assert c["reward_groups"] == len(data.reward_train.groups)
    assert c["ppo_prompts"] + c["gate_prompts"] == c["prompts_read"] == 20
    assert c["ppo_prompts"] == len(data.ppo_prompts) and c["gate_prompts"] == len(data.gate_prompts)


def test_budgets_cap_each_side(round_db, seed_store):
    seed_store(round_db, 10)
    data = _read(round_db, max_ppo=3, max_gate=2)
    assert (len(data.ppo_prompts), len(data.gate_prompts)) == (3, 2)
    assert data.counts["ppo_prompts"] == 3 and data.counts["gate_prompts"] == 2


def test_a_prompts_comparisons_and_opposite_thumbs_form_one_traceable_group(round_db):
    """The same question in two conversations: a comparison in one, opposite thumbs in the
    other, and a repeat of the comparison: one group of two pairs, each pair naming its rows."""

    async def write():
        async with await psycopg.AsyncConnection.connect(round_db) as conn:
            user = await store.user_for_token(conn, "merge-user")
            ids = {}
            for name, (good, bad, how) in {
                "first": ("Use a watering can.", "Pour a bucket.", "compare"),
                "second": ("Mist the leaves.", "Never water it.", "thumbs"),
                "again": ("Use a watering can.", "Pour a bucket.", "compare"),
            }.items():
                chat = await store.create_conversation(conn, user, name)
                q = await store.add_message(conn, user, chat.id, None, "user", "How do I water a fern?")
                a = await store.add_message(conn, user, chat.id, q.id, "assistant", good, model_version=SERVING)
                b = await store.add_message(conn, user, chat.id, q.id, "assistant", bad, model_version=SERVING)
                if how == "compare":
                    ids[name] = await store.record_comparison(conn, user, a.id, b.id, "better")
                else:
                    ids[name] = (await store.record_rating(conn, user, a.id, 1), await store.record_rating(conn, user, b.id, -1))
                ids[f"{name}_prompt"] = q.id
            return ids

    ids = asyncio.run(write())
    data = _read(round_db, held_out=0.01)  # (almost) nothing held out: the group is on the training side
    groups = [*data.reward_train.groups, *data.reward_held_out.groups]
    assert len(groups) == 1
    (group,) = groups
    pairs = {(p.chosen, p.rejected): p.source for p in group.pairs}
    assert set(pairs) == {("Use a watering can.", "Pour a bucket."), ("Mist the leaves.", "Never water it.")}
    assert pairs[("Use a watering can.", "Pour a bucket.")] in {f"comparison:{ids['first']}", f"comparison:{ids['again']}"}
    assert pairs[("Mist the leaves.", "Never water it.")] == "ratings:" + ",".join(map(str, sorted(ids["second"])))
    assert f"prompt:{ids['second_prompt']}" in group.source
    assert data.counts["thumb_pairs"] == 1


def test_too_little_data_says_what_is_missing(round_db, seed_store):
    seed_store(round_db, 1)
    data = _read(round_db)
    reason = too_little(data, min_pairs=5, min_prompts=5, min_gate_prompts=1)
    assert reason.startswith("too little data:")
    assert "preference pairs (need 5)" in reason and "training prompts (need 5)" in reason
    assert too_little(data, min_pairs=0, min_prompts=0, min_gate_prompts=0) is None


def test_the_reward_budget_samples_the_training_side_and_counts_the_rest(round_db, seed_store):
    seed_store(round_db, 10)
    full = _read(round_db, held_out=0.01)
    items = len(full.reward_train.groups) + len(full.reward_train.thumbs)
    capped = read_round_data(round_db, held_out_percent=0.01, max_ppo_prompts=100, max_gate_prompts=100,
                             max_reward_examples=5, seed=1)
    assert len(capped.reward_train.groups) + len(capped.reward_train.thumbs) == 5
    assert capped.counts["reward_examples_over_budget"] == items - 5
    assert capped.counts["reward_pairs"] == capped.reward_train.counts()["pairs"]
    other = read_round_data(round_db, held_out_percent=0.01, max_ppo_prompts=100, max_gate_prompts=100,
                            max_reward_examples=5, seed=2)
    assert other.fingerprint() != capped.fingerprint()  # another round, another sample


def test_ppo_prompts_are_a_fresh_sample_of_all_training_prompts_each_round(round_db, seed_store):
    """Issue 13: every round trained on the same md5-ordered prefix. Now each seed draws its
    own uniform sample of the whole training side; the gate's prompts stay the same."""
    seed_store(round_db, 10)
    everything = _read(round_db)
    training = {p.message_id for p in everything.ppo_prompts}
    samples = [read_round_data(round_db, held_out_percent=50.0, max_ppo_prompts=3, max_gate_prompts=2, seed=s)
               for s in range(8)]
    drawn = [{p.message_id for p in data.ppo_prompts} for data in samples]
    assert all(len(d) == 3 and d <= training for d in drawn)
    assert len(set(map(frozenset, drawn))) > 1  # rounds differ
    assert len(set().union(*drawn)) > 3  # not a fixed prefix
    assert all(data.counts["training_prompts"] == len(training) for data in samples)
    assert len({tuple(p.message_id for p in data.gate_prompts) for data in samples}) == 1
    again = read_round_data(round_db, held_out_percent=50.0, max_ppo_prompts=3, max_gate_prompts=2, seed=5)
    assert [p.message_id for p in again.ppo_prompts] == [p.message_id for p in samples[5].ppo_prompts]


def test_thumbed_answers_are_a_policys_finished_or_cut_answers_on_the_training_side(round_db):
    """Thumbs on answers that ended ('stop') or were cut at the limit ('length') are learnt, up
    and down; a cancelled answer, one whose end is not on record, and a person's text (a
    demonstration, model_version None) are not; a held-out prompt's are only counted."""
    answers = {  # text: (finish_reason, rating)
        "Water it weekly.": ("stop", 1),
        "Water it weekly and check the soil before you": ("length", 1),
        "Never water it.": ("stop", -1),
        "Water it when": ("cancelled", 1),
        "Water it daily.": (None, 1),
    }

    async def write():
        async with await psycopg.AsyncConnection.connect(round_db) as conn:
            user = await store.user_for_token(conn, "liking-user")
            ids = {}
            for question in ("How do I water a fern?", "How much light does fern 1 need?"):
                chat = await store.create_conversation(conn, user, question)
                q = await store.add_message(conn, user, chat.id, None, "user", question)
                for text, (finish, rating) in answers.items():
                    a = await store.add_message(conn, user, chat.id, q.id, "assistant", text,
                                                model_version=SERVING, finish_reason=finish)
                    await store.record_rating(conn, user, a.id, rating)
                    ids[(question, text)] = a.id
                # The user's own rewrite of the disliked answer, liked: a demonstration already.
                edit = await store.record_demonstration(conn, user, ids[(question, "Never water it.")],
                                                        "I would water it on Sundays.")
                await store.record_rating(conn, user, edit.message.id, 1)
            return ids

    ids = asyncio.run(write())
    assert not is_held_out([{"role": "user", "content": "How do I water a fern?"}], 50)
    assert is_held_out([{"role": "user", "content": "How much light does fern 1 need?"}], 50)
    data = _read(round_db)
    thumbed = {r.answer.content: r for r in data.thumbed}
    assert set(thumbed) == {"Water it weekly.", "Water it weekly and check the soil before you", "Never water it."}
    assert [r.answer.content for r in data.liked] == [r.answer.content for r in data.thumbed if r.label > 0]
    assert {r.answer.content for r in data.liked} == {"Water it weekly.", "Water it weekly and check the soil before you"}
    assert {r.finish_reason for r in data.thumbed} == {"stop", "length"}
    assert all(r.created_at is not None for r in data.thumbed)
    c = data.counts
    assert (c["liked_answers"], c["disliked_answers"], c["held_out_thumbed_answers"], c["thumbed_answers_left_out"]) == (2, 1, 3, 4)
    trace = data.trace()
    assert trace["liked_answer_ids"] == [str(r.answer.id) for r in data.liked]
    assert trace["disliked_answer_ids"] == [str(ids[("How do I water a fern?", "Never water it.")])]
