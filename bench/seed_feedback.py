"""Seed a store with a few dozen conversations of feedback, to time a retraining round on.

    DATABASE_URL=... python bench/seed_feedback.py --conversations 48
    DATABASE_URL=... python -m retrain once

Simulated users ask everyday questions (some conversations with a system prompt, 1-3 user
turns each), regenerate about half of the answers and compare the two, and thumb some answers.
Their taste is planted: an answer that is helpful (a short greeting, concrete steps, an offer
to help further) beats a curt or evasive one, with some noise; so the reward model has
something real to learn and its held-out accuracy means something. A share of conversations
opts out of data use, as real users do. The texts are written here, not generated, so seeding
takes seconds and needs no model; their lengths (tens to ~150 tokens) are those of chat answers.

Writes through the store's own API (feedback/store.py), exactly as the server does. Reads
DATABASE_URL / DATA_DIR like every command and migrates first.
"""

from __future__ import annotations

import argparse
import asyncio
import random
from collections import Counter
from pathlib import Path

import psycopg

from feedback import store
from feedback.db import database_url
from feedback.migrate import migrate
from feedback.settings import StoreSettings

TOPICS = [
    ("water a fern", "keep the soil moist", "mist the leaves", "avoid direct sun"),
    ("boil an egg", "bring water to a boil", "cook for nine minutes", "cool it in cold water"),
    ("learn Python", "install Python 3", "write small scripts daily", "read other people's code"),
    ("sleep better", "keep a fixed bedtime", "avoid screens late", "keep the room cool"),
    ("save money", "track every expense", "set a monthly budget", "automate a savings transfer"),
    ("start running", "begin with short runs", "run three times a week", "increase distance slowly"),
    ("write a cover letter", "address the hiring manager", "match the job's keywords", "keep it to one page"),
    ("clean a cast iron pan", "rinse with hot water", "dry it on the stove", "rub in a thin layer of oil"),
    ("prepare for an exam", "make a study schedule", "practise past papers", "sleep well the night before"),
    ("make a good coffee", "use freshly ground beans", "weigh the water", "brew at about 94 degrees"),
    ("fix a flat bicycle tyre", "remove the wheel", "find the hole with water", "patch it and reinflate"),
    ("plan a trip to Rome", "book flights early", "reserve the Vatican tickets", "walk between the sights"),
    ("reduce stress", "take short walks", "breathe slowly for a minute", "talk to a friend"),
    ("grow tomatoes", "plant them in full sun", "water at the base", "stake the stems"),
    ("back up my laptop", "buy an external drive", "schedule automatic backups", "keep one copy offsite"),
    ("give a good presentation", "know your first minute by heart", "use few words per slide", "rehearse out loud"),
]
QUESTIONS = ["How do I {t}?", "What's the best way to {t}?", "Can you help me {t}?", "Any tips to {t}?",
             "I want to {t}. Where do I start?"]
FOLLOW_UPS = ["Thanks! How long does that take?", "What is the most common mistake?",
              "Can you make that shorter?", "Why does the second step matter?", "Is there a cheaper way?"]
SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a concise, friendly assistant."]


def helpful_answer(rng: random.Random, topic: tuple[str, ...]) -> str:
    task, *steps = topic
    opener = rng.choice(["Sure!", "Happy to help.", "Good question.", "Of course."])
    lines = [f"{opener} To {task}:"]
    lines += [f"{i}. {step[0].upper()}{step[1:]}." for i, step in enumerate(rng.sample(steps, len(steps)), 1)]
    if rng.random() < 0.7:
        lines.append(rng.choice(["Would you like more detail on any step?", "Let me know if you want a checklist.",
                                 "Tell me more about your situation and I can tailor this."]))
    return "\n".join(lines)


def curt_answer(rng: random.Random, topic: tuple[str, ...]) -> str:
    task, *steps = topic
    return rng.choice([
        f"Just {steps[0]}.",
        f"Look it up, there are many guides on how to {task}.",
        "It depends.",
        f"{steps[-1].capitalize()}. That's it.",
        f"People usually {rng.choice(steps)}, but I can't say more.",
    ])


def follow_up_answer(rng: random.Random, topic: tuple[str, ...], question: str, helpful: bool) -> str:
    task, *steps = topic
    if not helpful:
        return rng.choice(["Not sure.", "Same as before.", "It varies."])
    return (f"Good follow-up. For \"{question.lower().rstrip('?')}\" when you {task}: the key is to "
            f"{rng.choice(steps)}, and most people see results within a few weeks. Want an example?")


async def seed(url: str, conversations: int, users: int, opt_out: float, noise: float, seed_value: int) -> Counter:
    rng = random.Random(seed_value)
    counts: Counter = Counter()
    version = "seed-policy"  # the model_version the seeded answers record
    async with await psycopg.AsyncConnection.connect(url) as conn:
        people = [await store.user_for_token(conn, f"bench-user-{seed_value}-{i}") for i in range(users)]
        for n in range(conversations):
            user = rng.choice(people)
            topic = TOPICS[n % len(TOPICS)]
            allow = rng.random() >= opt_out
            chat = await store.create_conversation(conn, user, f"{topic[0]} #{n}", allow_data_use=allow)
            counts["conversations"] += 1
            counts["opted_out"] += not allow

            async def say(parent, role, text):
                return await store.add_message(conn, user, chat.id, parent, role, text,
                                               model_version=version if role == "assistant" else None)

            parent = (await say(None, "system", rng.choice(SYSTEM_PROMPTS))).id if rng.random() < 0.3 else None
            for turn in range(rng.choice([1, 2, 2, 3])):
                question = rng.choice(QUESTIONS).format(t=topic[0]) if turn == 0 else rng.choice(FOLLOW_UPS)
                asked = await say(parent, "user", question)
                counts["prompts"] += 1

                def answer(helpful: bool) -> str:
                    if turn == 0:
                        return helpful_answer(rng, topic) if helpful else curt_answer(rng, topic)
                    return follow_up_answer(rng, topic, question, helpful)

                first_helpful = rng.random() < 0.5
                first = await say(asked.id, "assistant", answer(first_helpful))
                kept = first
                if rng.random() < 0.6:  # regenerate and compare
                    second = await say(asked.id, "assistant", answer(not first_helpful))
                    prefer_first = first_helpful if rng.random() >= noise else not first_helpful
                    verdict = "same" if rng.random() < 0.05 else ("better" if prefer_first else "worse")
                    await store.record_comparison(conn, user, first.id, second.id, verdict)
                    counts["comparisons"] += 1
                    kept = first if prefer_first else second
                if rng.random() < 0.5:  # a thumb on the answer the user kept
                    helpful = first_helpful if kept is first else not first_helpful
                    liked = helpful if rng.random() >= noise else not helpful
                    await store.record_rating(conn, user, kept.id, 1 if liked else -1)
                    counts["thumbs"] += 1
                parent = kept.id
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description="Seed a feedback store with simulated conversations.")
    parser.add_argument("--conversations", type=int, default=48, help="how many conversations (default 48)")
    parser.add_argument("--users", type=int, default=6, help="simulated users (default 6)")
    parser.add_argument("--opt-out", type=float, default=0.1, help="share of conversations with data use off")
    parser.add_argument("--noise", type=float, default=0.15, help="share of judgements against the planted taste")
    parser.add_argument("--seed", type=int, default=0, help="random seed (a new seed adds new users' chats)")
    args = parser.parse_args()
    url = database_url(StoreSettings())
    migrate(url)
    counts = asyncio.run(seed(url, args.conversations, args.users, args.opt_out, args.noise, args.seed))
    print(f"seeded {Path(__file__).name}: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))


if __name__ == "__main__":
    main()
