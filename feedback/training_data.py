"""Batch reads for retraining: preference groups, thumb pairs, pointwise thumbs, prompts,
demonstrations.

Synchronous (retraining is a batch job) and streaming: each reader is a generator over a
server-side cursor, so PostgreSQL does the joins, path walks and deduplication and the client
holds one batch of rows at a time. Give each reader a connection of its own while you iterate
(its cursor lives in a transaction on that connection).

Rules every reader follows:
- Only conversations with allow_data_use = true are read, checked at read time, so a user who
  opts out later is excluded from the next round.
- A prompt is the branch from the root to the message being answered, as chat turns
  ({"role", "content"}, system prompt included), with the ids of those messages.
- Every example carries the ids of the rows it came from (messages, comparisons, ratings).
- Identical examples (same prompt text and same answer texts) are kept once, the earliest;
  a "pair" whose two answers have the same text teaches nothing and is dropped.
- 'same' verdicts are read as ties (`Preference.tie`): the reward model's loss has a tie term
  that pulls the two scores together. `ComparisonGroup.pairs()` yields the strict verdicts only
  (what a chosen/rejected export can say), `ties()` the ties.
- Every thumb is a pointwise label (`thumbs`), whether or not its answer was also compared or
  has an opposite-thumbed sibling: a comparison says which of two answers is better, a thumb
  says whether this one is good, and a pairwise loss cannot see the latter.
- A thumb pair whose two answers were also compared directly is left to the comparison: the
  direct judgement is the more deliberate signal, and counting it twice would weight it double.
- A demonstration (an answer a user edited into the one they wanted) is read by
  `demonstrations`, for SFT; its "edit beats original" comparison is an ordinary comparison,
  read by `comparison_groups` for the reward model like any other.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Any, TypedDict
from uuid import UUID, uuid4

import psycopg
from psycopg.rows import dict_row

BATCH_ROWS = 500  # rows per round trip of a server-side cursor


class ChatTurn(TypedDict):
    role: str
    content: str


@dataclass(frozen=True)
class Answer:
    id: UUID  # messages.id
    content: str
    model_version: str | None  # the checkpoint that wrote it


@dataclass(frozen=True)
class Preference:
    chosen_id: UUID  # for a tie: the message the verdict was given on
    rejected_id: UUID  # for a tie: the other message
    comparison_id: int  # comparisons.id
    tie: bool = False  # a 'same' verdict: neither answer is better


@dataclass(frozen=True)
class ComparisonGroup:
    """All judged pairs among the answers to one prompt: one group for the reward model."""

    prompt_id: UUID  # the message the answers reply to
    prompt: list[ChatTurn]  # root .. prompt message
    prompt_ids: list[UUID]  # messages.id of each turn of `prompt`
    answers: list[Answer]  # every answer that appears in a preference, oldest first
    preferences: list[Preference]  # strict verdicts and ties

    def pairs(self) -> Iterator[tuple[Answer, Answer, Preference]]:
        """(chosen, rejected, preference) for each strict ('better'/'worse') preference."""
        yield from self._resolved(tie=False)

    def ties(self) -> Iterator[tuple[Answer, Answer, Preference]]:
        """(answer, other, preference) for each 'same' verdict of the group."""
        yield from self._resolved(tie=True)

    def _resolved(self, tie: bool) -> Iterator[tuple[Answer, Answer, Preference]]:
        by_id = {answer.id: answer for answer in self.answers}
        for preference in self.preferences:
            if preference.tie == tie:
                yield by_id[preference.chosen_id], by_id[preference.rejected_id], preference


@dataclass(frozen=True)
class ThumbPair:
    """Two answers to one prompt with opposite net thumbs: (chosen, rejected)."""

    prompt_id: UUID
    prompt: list[ChatTurn]
    prompt_ids: list[UUID]
    chosen: Answer
    rejected: Answer
    rating_ids: list[int]  # ratings.id of the votes on both answers


@dataclass(frozen=True)
class RatedAnswer:
    """A thumbed answer: a pointwise label (compared or paired or not)."""

    prompt_id: UUID
    prompt: list[ChatTurn]
    prompt_ids: list[UUID]
    answer: Answer
    label: int  # +1 or -1: the sign of the answer's net thumbs
    rating_ids: list[int]
    finish_reason: str | None = None  # stop: the turn ended; length: cut at the token limit
    created_at: datetime | None = None  # when the answer was written


@dataclass(frozen=True)
class LoggedPrompt:
    """A user turn with its context, for PPO rollouts and the gate's held-out prompts."""

    message_id: UUID  # the user message
    conversation_id: UUID
    messages: list[ChatTurn]  # root .. the user message
    message_ids: list[UUID]
    created_at: datetime


# -- SQL --------------------------------------------------------------------------------------
# `targets(id)` is defined by each query; these CTEs give every target its branch from the root.
_CONTEXTS = """
up AS (
    SELECT t.id AS start_id, m.id, m.parent_id, m.role, m.content, 0 AS depth
    FROM targets t JOIN messages m ON m.id = t.id
  UNION ALL
    SELECT up.start_id, m.id, m.parent_id, m.role, m.content, up.depth + 1
    FROM up JOIN messages m ON m.id = up.parent_id
),
contexts AS (
    SELECT start_id AS id,
           json_agg(json_build_object('role', role, 'content', content)
                    ORDER BY depth DESC) AS turns,
           array_agg(id ORDER BY depth DESC) AS ids
    FROM up GROUP BY start_id
)"""

# Net thumbs per assistant answer in usable conversations (one vote per user and message).
_NET_THUMBS = """
net AS (
    SELECT m.id, m.parent_id, m.content, m.model_version, m.created_at, m.finish_reason,
           sum(r.rating) AS net, array_agg(r.id ORDER BY r.id) AS rating_ids
    FROM ratings r
    JOIN messages m ON m.id = r.message_id
    JOIN conversations c ON c.id = m.conversation_id
    WHERE c.allow_data_use AND m.role = 'assistant' AND m.parent_id IS NOT NULL
    GROUP BY m.id
)"""

_COMPARISON_GROUPS = f"""
WITH RECURSIVE
judged AS (
    SELECT cmp.id AS comparison_id, a.parent_id AS prompt_id,
           CASE cmp.verdict WHEN 'worse' THEN b.id ELSE a.id END AS chosen_id,
           CASE cmp.verdict WHEN 'worse' THEN a.id ELSE b.id END AS rejected_id,
           cmp.verdict = 'same' AS tie
    FROM comparisons cmp
    JOIN messages a ON a.id = cmp.message_id
    JOIN messages b ON b.id = cmp.other_id
    JOIN conversations c ON c.id = a.conversation_id
    WHERE c.allow_data_use
      AND a.parent_id IS NOT NULL AND b.parent_id = a.parent_id
      AND a.content <> b.content
),
targets AS (SELECT DISTINCT prompt_id AS id FROM judged),
{_CONTEXTS},
pairs AS (
    SELECT DISTINCT ON (md5(ctx.turns::text), md5(ch.content), md5(rj.content), j.tie)
           j.prompt_id, j.comparison_id, j.chosen_id, j.rejected_id, j.tie
    FROM judged j
    JOIN contexts ctx ON ctx.id = j.prompt_id
    JOIN messages ch ON ch.id = j.chosen_id
    JOIN messages rj ON rj.id = j.rejected_id
    ORDER BY md5(ctx.turns::text), md5(ch.content), md5(rj.content), j.tie, j.comparison_id
),
answers AS (
    SELECT ids.prompt_id,
           json_agg(json_build_object('id', m.id, 'content', m.content,
                                      'model_version', m.model_version)
                    ORDER BY m.created_at, m.id) AS answers
    FROM (SELECT prompt_id, chosen_id AS id FROM pairs
          UNION SELECT prompt_id, rejected_id FROM pairs) ids
    JOIN messages m ON m.id = ids.id
    GROUP BY ids.prompt_id
),
groups AS (
    SELECT prompt_id,
           json_agg(json_build_object('chosen_id', chosen_id, 'rejected_id', rejected_id,
                                      'comparison_id', comparison_id, 'tie', tie)
                    ORDER BY comparison_id) AS preferences
    FROM pairs GROUP BY prompt_id
)
SELECT g.prompt_id, ctx.turns AS prompt, ctx.ids AS prompt_ids, a.answers, g.preferences
FROM groups g
JOIN contexts ctx ON ctx.id = g.prompt_id
JOIN answers a ON a.prompt_id = g.prompt_id
ORDER BY g.prompt_id"""

_THUMB_PAIRS = f"""
WITH RECURSIVE
{_NET_THUMBS},
opposed AS (
    SELECT good.parent_id AS prompt_id,
           good.id AS chosen_id, good.content AS chosen_content,
           good.model_version AS chosen_model_version,
           bad.id AS rejected_id, bad.content AS rejected_content,
           bad.model_version AS rejected_model_version,
           good.rating_ids || bad.rating_ids AS rating_ids,
           greatest(good.created_at, bad.created_at) AS created_at
    FROM net good JOIN net bad ON bad.parent_id = good.parent_id
    WHERE good.net > 0 AND bad.net < 0 AND good.content <> bad.content
      AND NOT EXISTS (
          SELECT 1 FROM comparisons cmp
          WHERE LEAST(cmp.message_id, cmp.other_id) = LEAST(good.id, bad.id)
            AND GREATEST(cmp.message_id, cmp.other_id) = GREATEST(good.id, bad.id))
),
targets AS (SELECT DISTINCT prompt_id AS id FROM opposed),
{_CONTEXTS}
SELECT DISTINCT ON (md5(ctx.turns::text), md5(o.chosen_content), md5(o.rejected_content))
       o.*, ctx.turns AS prompt, ctx.ids AS prompt_ids
FROM opposed o JOIN contexts ctx ON ctx.id = o.prompt_id
ORDER BY md5(ctx.turns::text), md5(o.chosen_content), md5(o.rejected_content),
         o.created_at, o.chosen_id, o.rejected_id"""

_THUMBS = f"""
WITH RECURSIVE
{_NET_THUMBS},
single AS (SELECT * FROM net WHERE net <> 0),
targets AS (SELECT DISTINCT parent_id AS id FROM single),
{_CONTEXTS}
SELECT DISTINCT ON (md5(ctx.turns::text), md5(s.content), sign(s.net))
       s.id, s.parent_id AS prompt_id, s.content, s.model_version, s.finish_reason, s.created_at,
       sign(s.net)::int AS label, s.rating_ids, ctx.turns AS prompt, ctx.ids AS prompt_ids
FROM single s JOIN contexts ctx ON ctx.id = s.parent_id
ORDER BY md5(ctx.turns::text), md5(s.content), sign(s.net), s.created_at, s.id"""

_PROMPTS = f"""
WITH RECURSIVE
targets AS (
    SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE c.allow_data_use AND m.role = 'user'
),
{_CONTEXTS}
SELECT DISTINCT ON (md5(ctx.turns::text))
       m.id AS message_id, m.conversation_id, m.created_at,
       ctx.turns AS messages, ctx.ids AS message_ids
FROM contexts ctx JOIN messages m ON m.id = ctx.id
ORDER BY md5(ctx.turns::text), m.created_at, m.id"""


# Demonstrations: answers a user edited into the one they wanted (messages written by a person,
# author_id set), each with the branch that leads to it. Same (prompt, answer) texts: the
# earliest is kept.
_DEMONSTRATIONS = f"""
WITH RECURSIVE
demos AS (
    SELECT m.id, m.parent_id, m.content, m.edited_from, m.author_id, m.created_at
    FROM messages m JOIN conversations c ON c.id = m.conversation_id
    WHERE c.allow_data_use AND m.role = 'assistant' AND m.author_id IS NOT NULL
      AND m.parent_id IS NOT NULL
),
targets AS (SELECT DISTINCT parent_id AS id FROM demos),
{_CONTEXTS}
SELECT DISTINCT ON (md5(ctx.turns::text), md5(d.content))
       d.id, d.parent_id AS prompt_id, d.content, d.edited_from, d.author_id, d.created_at,
       ctx.turns AS prompt, ctx.ids AS prompt_ids
FROM demos d JOIN contexts ctx ON ctx.id = d.parent_id
ORDER BY md5(ctx.turns::text), md5(d.content), d.created_at, d.id"""


def _stream(conn: psycopg.Connection, query: str, args: Any = None) -> Iterator[dict[str, Any]]:
    """Rows of `query` through a server-side cursor, BATCH_ROWS at a time."""
    # A named cursor lives inside a transaction; on an autocommit connection this opens one.
    with conn.transaction():
        with conn.cursor(name=f"flywheel_{uuid4().hex}", row_factory=dict_row) as cur:
            cur.itersize = BATCH_ROWS
            cur.execute(query, args)
            yield from cur


def _answer(row: dict[str, Any], prefix: str = "") -> Answer:
    return Answer(
        id=UUID(str(row[f"{prefix}id"])),
        content=row[f"{prefix}content"],
        model_version=row[f"{prefix}model_version"],
    )


# -- readers ----------------------------------------------------------------------------------


def comparison_groups(conn: psycopg.Connection) -> Iterator[ComparisonGroup]:
    """One group per prompt with every verdict among its answers ('same' ones as ties)."""
    for row in _stream(conn, _COMPARISON_GROUPS):
        yield ComparisonGroup(
            prompt_id=row["prompt_id"],
            prompt=row["prompt"],
            prompt_ids=row["prompt_ids"],
            answers=[_answer(a) for a in row["answers"]],
            preferences=[
                Preference(UUID(p["chosen_id"]), UUID(p["rejected_id"]), p["comparison_id"], p["tie"])
                for p in row["preferences"]
            ],
        )


def thumb_pairs(conn: psycopg.Connection) -> Iterator[ThumbPair]:
    """Every (thumbed up, thumbed down) pair of answers to the same prompt."""
    for row in _stream(conn, _THUMB_PAIRS):
        yield ThumbPair(
            prompt_id=row["prompt_id"],
            prompt=row["prompt"],
            prompt_ids=row["prompt_ids"],
            chosen=_answer(row, "chosen_"),
            rejected=_answer(row, "rejected_"),
            rating_ids=row["rating_ids"],
        )


def thumbs(conn: psycopg.Connection) -> Iterator[RatedAnswer]:
    """Every thumbed answer (net thumbs not 0), compared or not: the reward model's pointwise
    term. An answer in a comparison or a thumb pair is also here: the two say different things."""
    for row in _stream(conn, _THUMBS):
        yield RatedAnswer(
            prompt_id=row["prompt_id"],
            prompt=row["prompt"],
            prompt_ids=row["prompt_ids"],
            answer=_answer(row),
            label=row["label"],
            rating_ids=row["rating_ids"],
            finish_reason=row["finish_reason"],
            created_at=row["created_at"],
        )


def prompts(conn: psycopg.Connection, limit: int | None = None) -> Iterator[LoggedPrompt]:
    """Distinct user turns with their context (at most `limit`), in a fixed pseudo-random
    order (by a hash of the text), so a prefix of the stream is an unbiased sample."""
    query = _PROMPTS if limit is None else _PROMPTS + "\nLIMIT %s"
    for row in _stream(conn, query, None if limit is None else (limit,)):
        yield LoggedPrompt(
            message_id=row["message_id"],
            conversation_id=row["conversation_id"],
            messages=row["messages"],
            message_ids=row["message_ids"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True)
class Demonstration:
    """An answer a user wrote (edited from the model's): what the policy should have said."""

    prompt_id: UUID  # the message the demonstration answers
    prompt: list[ChatTurn]  # root .. prompt message
    prompt_ids: list[UUID]
    answer: Answer  # the user's text (model_version None: no policy wrote it)
    edited_from: UUID | None  # the answer it was edited from (None: that one was deleted)
    author_id: int  # users.id of the person who wrote it
    created_at: datetime


def demonstrations(conn: psycopg.Connection) -> Iterator[Demonstration]:
    """Every demonstration in conversations that allow data use, each (prompt, answer) text
    once, in a fixed order (by a hash of the texts)."""
    for row in _stream(conn, _DEMONSTRATIONS):
        yield Demonstration(
            prompt_id=row["prompt_id"],
            prompt=row["prompt"],
            prompt_ids=row["prompt_ids"],
            answer=Answer(id=row["id"], content=row["content"], model_version=None),
            edited_from=row["edited_from"],
            author_id=row["author_id"],
            created_at=row["created_at"],
        )


@dataclass(frozen=True)
class NewFeedback:
    """What users sent after some moment, as the scheduler counts it: `votes` are the thumbs
    (new or changed) and the comparisons they made; `edits` the answers they rewrote. An edit's
    own "edit beats original" comparison is counted as the edit, not again as a vote."""

    votes: int
    edits: int


def feedback_count_since(conn: psycopg.Connection, since: datetime) -> NewFeedback:
    """Votes and edits recorded after `since` in usable conversations: the scheduler's
    "enough new feedback" triggers."""
    if since.tzinfo is None:
        raise ValueError("since must be timezone-aware (e.g. datetime.now(timezone.utc))")
    with conn.transaction():
        row = conn.execute(
            """SELECT
                 (SELECT count(*) FROM ratings r
                  JOIN messages m ON m.id = r.message_id
                  JOIN conversations c ON c.id = m.conversation_id
                  WHERE c.allow_data_use AND r.updated_at > %(since)s)
               + (SELECT count(*) FROM comparisons cmp
                  JOIN messages m ON m.id = cmp.message_id
                  JOIN conversations c ON c.id = m.conversation_id
                  WHERE c.allow_data_use AND cmp.updated_at > %(since)s
                    AND NOT (m.edited_from IS NOT NULL AND m.edited_from = cmp.other_id
                             AND m.author_id = cmp.user_id)),
                 (SELECT count(*) FROM messages m
                  JOIN conversations c ON c.id = m.conversation_id
                  WHERE c.allow_data_use AND m.role = 'assistant' AND m.edited_from IS NOT NULL
                    AND m.created_at > %(since)s)""",
            {"since": since},
        ).fetchone()
    assert row is not None
    return NewFeedback(votes=int(row[0]), edits=int(row[1]))
