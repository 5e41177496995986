"""The store API the server calls: users, conversations, the message tree, thumbs, comparisons.

Every function takes a `psycopg.AsyncConnection` first (from the server's `AsyncConnectionPool`:
`async with pool.connection() as conn: ...`) and a `User` where the data is private.

Contract:
- Each function runs in its own `conn.transaction()`, so a write has been committed when the
  call returns (feedback is durable before the server acknowledges it). Inside a transaction the
  caller opened itself, it becomes a savepoint: nothing commits before the caller's block does.
- A refusal raises a `feedback.errors.StoreError` subclass and leaves nothing written.
- Another user's conversation or message is `NotFound`, the same as an unknown id (see errors).
- Ids may be given as `uuid.UUID` or as strings; a malformed one is `InvalidId`.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import Any, TypeVar
from uuid import UUID

import psycopg
from psycopg.rows import class_row, tuple_row
from psycopg.types.json import Jsonb

from .errors import (
    AlreadyExists,
    EmptyContent,
    InvalidId,
    InvalidInput,
    InvalidRating,
    InvalidToken,
    InvalidVerdict,
    NotAssistant,
    NotFound,
    NotSibling,
    SelfComparison,
    TooLong,
    UnchangedEdit,
    WrongConversation,
    WrongRole,
)
from .settings import StoreSettings

ROLES = ("system", "user", "assistant")
# What the server may record as how an answer ended; the gate reads 'length' as truncation.
FINISH_REASONS = ("stop", "length", "cancelled", "error")
VERDICTS = ("better", "worse", "same")
MAX_TOKEN_CHARS = 1024
MAX_MODEL_VERSION_CHARS = 200
MAX_PAGE = 200


# -- records ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    id: int
    name: str | None
    created_at: datetime


@dataclass(frozen=True)
class Conversation:
    id: UUID
    user_id: int
    title: str
    allow_data_use: bool  # false: never read by retraining
    created_at: datetime
    updated_at: datetime  # last message added (list order)


@dataclass(frozen=True)
class Message:
    id: UUID
    conversation_id: UUID
    parent_id: UUID | None  # None: a root; same parent = siblings (regenerations)
    role: str  # one of ROLES
    content: str
    model_version: str | None  # checkpoint that wrote an assistant message
    prompt_tokens: int | None
    completion_tokens: int | None
    finish_reason: str | None  # one of FINISH_REASONS
    params: dict[str, Any]  # sampling parameters used (temperature, top_p, max_new_tokens)
    created_at: datetime
    # An edit's author (a demonstration, or an edited question); None: written the ordinary
    # way (the conversation's user for a user turn, model_version's policy for an answer).
    author_id: int | None
    edited_from: UUID | None  # the sibling this message was edited from (None: not an edit)


@dataclass(frozen=True)
class RatedMessage(Message):
    rating: int | None  # this user's current thumb: 1, -1, or None
    rating_reason: str | None


@dataclass(frozen=True)
class ConversationTree:
    conversation: Conversation
    messages: list[RatedMessage]  # every message, oldest first; rebuild the tree by parent_id


_MESSAGE_FIELDS = (
    "id conversation_id parent_id role content model_version prompt_tokens completion_tokens "
    "finish_reason params created_at author_id edited_from"
).split()
_CONVERSATION_FIELDS = "id user_id title allow_data_use created_at updated_at".split()


def _columns(fields: list[str], alias: str) -> str:
    return ", ".join(f"{alias}.{f}" for f in fields)


M = _columns(_MESSAGE_FIELDS, "m")
C = _columns(_CONVERSATION_FIELDS, "c")

R = TypeVar("R")


# -- input checks (before any SQL, so a refusal costs no round trip) -------------------------


@cache
def _default_settings() -> StoreSettings:
    # Read lazily, not at import; the server may pass its own settings object instead.
    return StoreSettings()


def parse_id(value: object, field: str) -> UUID:
    """A UUID from a UUID or its string form; anything else is `InvalidId`."""
    if isinstance(value, UUID):
        return value
    if isinstance(value, str):
        try:
            return UUID(value)
        except ValueError:
            pass
    raise InvalidId(field, value)


def _optional_id(value: object, field: str) -> UUID | None:
    return None if value is None else parse_id(value, field)


def text_problem(value: str) -> str | None:
    """Why PostgreSQL (or a tokenizer) cannot hold `value`, or None when it can: text columns
    take no NUL character, and a lone surrogate (JSON's "\\ud800" unpaired) is not UTF-8."""
    if "\x00" in value:
        return f"contains a NUL character (\\x00) at position {value.index(chr(0))}: remove it"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return (f"contains a lone surrogate ({value[exc.start]!r}) at position {exc.start}, "
                "which is not text: send each emoji or rare character whole (a surrogate pair)")
    return None


def _check_text(value: object, field: str, limit: int, setting: str) -> str:
    if not isinstance(value, str):
        raise InvalidInput(f"{field} must be a string, not {type(value).__name__}")
    if len(value) > limit:
        raise TooLong(field, len(value), limit, setting)
    problem = text_problem(value)
    if problem:
        raise InvalidInput(f"{field} {problem}")
    return value


def _check_count(value: object, field: str) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise InvalidInput(f"{field} must be a non-negative integer or null, not {value!r}")
    return value


def _check_params(params: object) -> dict[str, Any]:
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise InvalidInput(f"params must be an object, not {type(params).__name__}")
    try:
        json.dumps(params, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"params must be plain JSON (numbers, strings, lists, objects): {exc}")
    return params


def _check_model_version(model_version: object) -> str:
    if not isinstance(model_version, str) or len(model_version) > MAX_MODEL_VERSION_CHARS:
        raise InvalidInput(
            f"model_version must be a checkpoint id of at most {MAX_MODEL_VERSION_CHARS} "
            f"characters, not {model_version!r:.80}"
        )
    return model_version


def _check_limit(limit: object) -> int:
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
        raise InvalidInput(f"limit must be an integer from 1 to {MAX_PAGE}, not {limit!r}")
    return limit


# -- small query helpers ----------------------------------------------------------------------


async def _one(conn: psycopg.AsyncConnection, row: type[R], query: str, args: Any) -> R | None:
    async with conn.cursor(row_factory=class_row(row)) as cur:
        await cur.execute(query, args)
        return await cur.fetchone()


async def _all(conn: psycopg.AsyncConnection, row: type[R], query: str, args: Any) -> list[R]:
    async with conn.cursor(row_factory=class_row(row)) as cur:
        await cur.execute(query, args)
        return await cur.fetchall()


async def _owned_message(conn: psycopg.AsyncConnection, user: User, message_id: UUID) -> Message:
    found = await _one(
        conn,
        Message,
        f"""SELECT {M} FROM messages m JOIN conversations c ON c.id = m.conversation_id
            WHERE m.id = %s AND c.user_id = %s""",
        (message_id, user.id),
    )
    if found is None:
        raise NotFound("message", message_id)
    return found


async def _owned_conversation(
    conn: psycopg.AsyncConnection, user: User, conversation_id: UUID
) -> Conversation:
    found = await _one(
        conn,
        Conversation,
        f"SELECT {C} FROM conversations c WHERE c.id = %s AND c.user_id = %s",
        (conversation_id, user.id),
    )
    if found is None:
        raise NotFound("conversation", conversation_id)
    return found


# -- users ------------------------------------------------------------------------------------


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


_SELECT_USER = "SELECT id, name, created_at FROM users WHERE token_hash = %s"


def _checked_token(token: str) -> str:
    if not isinstance(token, str) or not token or len(token) > MAX_TOKEN_CHARS:
        raise InvalidToken(
            f"a token is a non-empty string of at most {MAX_TOKEN_CHARS} characters: send it as "
            "'Authorization: Bearer TOKEN' or '?token=TOKEN'"
        )
    return token


async def find_user(conn: psycopg.AsyncConnection, token: str) -> User | None:
    """The user this token stands for, or None; never registers (for servers that issue tokens)."""
    return await _one(conn, User, _SELECT_USER, (hash_token(_checked_token(token)),))


async def user_for_token(conn: psycopg.AsyncConnection, token: str) -> User:
    """The user this bearer token stands for, created the first time the token is seen."""
    digest = hash_token(_checked_token(token))
    select = _SELECT_USER
    async with conn.transaction():
        user = await _one(conn, User, select, (digest,))
        if user is None:
            user = await _one(
                conn,
                User,
                """INSERT INTO users (token_hash) VALUES (%s)
                   ON CONFLICT (token_hash) DO NOTHING RETURNING id, name, created_at""",
                (digest,),
            )
        if user is None:  # another request created it between our two statements
            user = await _one(conn, User, select, (digest,))
    assert user is not None
    return user


# -- conversations ----------------------------------------------------------------------------


async def create_conversation(
    conn: psycopg.AsyncConnection,
    user: User,
    title: str = "",
    allow_data_use: bool = True,
    *,
    settings: StoreSettings | None = None,
) -> Conversation:
    limits = settings or _default_settings()
    _check_text(title, "title", limits.max_title_chars, "max_title_chars")
    if not isinstance(allow_data_use, bool):
        raise InvalidInput(f"allow_data_use must be true or false, not {allow_data_use!r}")
    async with conn.transaction():
        created = await _one(
            conn,
            Conversation,
            f"""INSERT INTO conversations AS c (user_id, title, allow_data_use)
                VALUES (%s, %s, %s) RETURNING {C}""",
            (user.id, title, allow_data_use),
        )
    assert created is not None
    return created


async def get_conversation(
    conn: psycopg.AsyncConnection, user: User, conversation_id: UUID | str
) -> Conversation:
    conversation_id = parse_id(conversation_id, "conversation_id")
    async with conn.transaction():
        return await _owned_conversation(conn, user, conversation_id)


async def update_conversation(
    conn: psycopg.AsyncConnection,
    user: User,
    conversation_id: UUID | str,
    *,
    title: str | None = None,
    allow_data_use: bool | None = None,
    settings: StoreSettings | None = None,
) -> Conversation:
    """Rename a conversation and/or opt it in or out of training (None: leave as is)."""
    conversation_id = parse_id(conversation_id, "conversation_id")
    limits = settings or _default_settings()
    if title is not None:
        _check_text(title, "title", limits.max_title_chars, "max_title_chars")
    if allow_data_use is not None and not isinstance(allow_data_use, bool):
        raise InvalidInput(f"allow_data_use must be true or false, not {allow_data_use!r}")
    async with conn.transaction():
        updated = await _one(
            conn,
            Conversation,
            f"""UPDATE conversations AS c
                SET title = COALESCE(%s, title), allow_data_use = COALESCE(%s, allow_data_use)
                WHERE c.id = %s AND c.user_id = %s RETURNING {C}""",
            (title, allow_data_use, conversation_id, user.id),
        )
    if updated is None:
        raise NotFound("conversation", conversation_id)
    return updated


# A conversation's version (conversations.model_version): the policy its answers run on, kept
# while it stays live so a canary conversation does not flip between policies (deploy/canary.py).
# Not owner-checked: the server reads and writes it for a conversation it has just read as its
# user, inside the same turn.


async def conversation_version(conn: psycopg.AsyncConnection, conversation_id: UUID | str) -> str | None:
    """The version conversation `conversation_id` runs on; None before its first answer (or for
    an unknown id: nothing was assigned to it)."""
    conversation_id = parse_id(conversation_id, "conversation_id")
    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        await cur.execute("SELECT model_version FROM conversations WHERE id = %s", (conversation_id,))
        row = await cur.fetchone()
    return row[0] if row else None


async def set_conversation_version(
    conn: psycopg.AsyncConnection, conversation_id: UUID | str, model_version: str
) -> None:
    """Make `model_version` (a checkpoint id) the version the conversation's answers run on."""
    conversation_id = parse_id(conversation_id, "conversation_id")
    _check_model_version(model_version)
    async with conn.transaction():
        cur = await conn.execute(
            "UPDATE conversations SET model_version = %s WHERE id = %s", (model_version, conversation_id)
        )
    if cur.rowcount == 0:
        raise NotFound("conversation", conversation_id)


async def list_conversations(
    conn: psycopg.AsyncConnection,
    user: User,
    limit: int = 50,
    before: UUID | str | None = None,
) -> list[Conversation]:
    """The user's conversations, most recently active first.

    `before` is the id of the last conversation of the previous page (keyset paging on
    (updated_at, id), so ties in time neither repeat nor skip a conversation).
    """
    limit = _check_limit(limit)
    before = _optional_id(before, "before")
    async with conn.transaction():
        if before is None:
            return await _all(
                conn,
                Conversation,
                f"""SELECT {C} FROM conversations c WHERE c.user_id = %s
                    ORDER BY c.updated_at DESC, c.id DESC LIMIT %s""",
                (user.id, limit),
            )
        cursor = await _owned_conversation(conn, user, before)
        return await _all(
            conn,
            Conversation,
            f"""SELECT {C} FROM conversations c
                WHERE c.user_id = %s AND (c.updated_at, c.id) < (%s, %s)
                ORDER BY c.updated_at DESC, c.id DESC LIMIT %s""",
            (user.id, cursor.updated_at, cursor.id, limit),
        )


async def conversation_tree(
    conn: psycopg.AsyncConnection, user: User, conversation_id: UUID | str
) -> ConversationTree:
    """A conversation with all its messages (every branch) and this user's thumbs on them."""
    conversation_id = parse_id(conversation_id, "conversation_id")
    async with conn.transaction():
        conversation = await _owned_conversation(conn, user, conversation_id)
        messages = await _all(
            conn,
            RatedMessage,
            f"""SELECT {M}, r.rating, r.reason AS rating_reason
                FROM messages m
                LEFT JOIN ratings r ON r.message_id = m.id AND r.user_id = %s
                WHERE m.conversation_id = %s
                ORDER BY m.created_at, m.id""",
            (user.id, conversation_id),
        )
    return ConversationTree(conversation, messages)


# -- messages ---------------------------------------------------------------------------------


async def add_message(
    conn: psycopg.AsyncConnection,
    user: User,
    conversation_id: UUID | str,
    parent_id: UUID | str | None,
    role: str,
    content: str,
    *,
    model_version: str | None = None,
    prompt_tokens: int | None = None,
    completion_tokens: int | None = None,
    finish_reason: str | None = None,
    params: dict[str, Any] | None = None,
    message_id: UUID | str | None = None,
    settings: StoreSettings | None = None,
) -> Message:
    """Append a message under `parent_id` (None: a new root) in one of the user's conversations.

    A regeneration is simply another message with the same parent. `message_id` lets the server
    announce an answer's id in its 'started' frame and store the finished answer under it.
    """
    conversation_id = parse_id(conversation_id, "conversation_id")
    parent_id = _optional_id(parent_id, "parent_id")
    message_id = _optional_id(message_id, "message_id")
    limits = settings or _default_settings()
    if role not in ROLES:
        raise InvalidInput(f"role {role!r} is not one of {', '.join(ROLES)}")
    _check_text(content, "content", limits.max_message_chars, "max_message_chars")
    if role == "assistant" and not model_version:
        raise InvalidInput(
            "an assistant message needs the model_version (checkpoint id) that wrote it, so its "
            "feedback can be attributed to a policy"
        )
    if model_version is not None:
        _check_model_version(model_version)
    _check_count(prompt_tokens, "prompt_tokens")
    _check_count(completion_tokens, "completion_tokens")
    if finish_reason is not None and finish_reason not in FINISH_REASONS:
        raise InvalidInput(
            f"finish_reason {finish_reason!r} is not one of {', '.join(FINISH_REASONS)}"
        )
    params = _check_params(params)

    try:
        async with conn.transaction():
            # Ownership check and "last active" bump in one statement; the row lock it takes
            # also orders concurrent appends to the same conversation.
            touched = await conn.execute(
                "UPDATE conversations SET updated_at = now() WHERE id = %s AND user_id = %s",
                (conversation_id, user.id),
            )
            if touched.rowcount == 0:
                raise NotFound("conversation", conversation_id)
            if parent_id is not None:
                parent = await _owned_message(conn, user, parent_id)
                if parent.conversation_id != conversation_id:
                    raise WrongConversation(parent_id, conversation_id)
            created = await _one(
                conn,
                Message,
                f"""INSERT INTO messages AS m (id, conversation_id, parent_id, role, content,
                        model_version, prompt_tokens, completion_tokens, finish_reason, params)
                    VALUES (COALESCE(%s, gen_random_uuid()), %s, %s, %s, %s, %s, %s, %s, %s, %s)
                    RETURNING {M}""",
                (
                    message_id,
                    conversation_id,
                    parent_id,
                    role,
                    content,
                    model_version,
                    prompt_tokens,
                    completion_tokens,
                    finish_reason,
                    Jsonb(params),
                ),
            )
    except psycopg.errors.UniqueViolation as exc:
        raise AlreadyExists("message", message_id) from exc  # type: ignore[arg-type]
    assert created is not None
    return created


async def get_message(conn: psycopg.AsyncConnection, user: User, message_id: UUID | str) -> Message:
    message_id = parse_id(message_id, "message_id")
    async with conn.transaction():
        return await _owned_message(conn, user, message_id)


async def newest_message(
    conn: psycopg.AsyncConnection, user: User, conversation_id: UUID | str
) -> Message | None:
    """The message a new turn continues from when the client sends no parent_id (None: empty)."""
    conversation_id = parse_id(conversation_id, "conversation_id")
    async with conn.transaction():
        await _owned_conversation(conn, user, conversation_id)
        return await _one(
            conn,
            Message,
            f"""SELECT {M} FROM messages m WHERE m.conversation_id = %s
                ORDER BY m.created_at DESC, m.id DESC LIMIT 1""",
            (conversation_id,),
        )


async def path_to_root(
    conn: psycopg.AsyncConnection, user: User, message_id: UUID | str
) -> list[Message]:
    """The branch that leads to a message: root first, the message itself last.

    This is the model's context for an answer to (or a regeneration under) that message.
    """
    message_id = parse_id(message_id, "message_id")
    columns = ", ".join(_MESSAGE_FIELDS)
    async with conn.transaction():
        path = await _all(
            conn,
            Message,
            f"""WITH RECURSIVE path AS (
                    SELECT {M}, 0 AS depth
                    FROM messages m JOIN conversations c ON c.id = m.conversation_id
                    WHERE m.id = %s AND c.user_id = %s
                  UNION ALL
                    SELECT {M}, path.depth + 1
                    FROM messages m JOIN path ON m.id = path.parent_id
                )
                SELECT {columns} FROM path ORDER BY depth DESC""",
            (message_id, user.id),
        )
    if not path:
        raise NotFound("message", message_id)
    return path


async def siblings(
    conn: psycopg.AsyncConnection, user: User, message_id: UUID | str
) -> list[Message]:
    """All answers to the same parent, the message itself included, oldest first (the UI's
    "2 / 3" switcher). For a root message: the conversation's roots."""
    message_id = parse_id(message_id, "message_id")
    async with conn.transaction():
        found = await _all(
            conn,
            Message,
            f"""SELECT {M}
                FROM messages self
                JOIN conversations c ON c.id = self.conversation_id AND c.user_id = %s
                JOIN messages m ON m.conversation_id = self.conversation_id
                               AND m.parent_id IS NOT DISTINCT FROM self.parent_id
                WHERE self.id = %s
                ORDER BY m.created_at, m.id""",
            (user.id, message_id),
        )
    if not found:
        raise NotFound("message", message_id)
    return found


async def find_path(
    conn: psycopg.AsyncConnection, user: User, turns: list[dict[str, str]]
) -> list[UUID]:
    """Ids of the longest stored path of the user's matching the start of `turns` (each a
    {"role", "content"}): root first, each message a child of the previous one, same role and
    content. The most recently active conversation's when several match; [] when not even the
    first message matches.

    The OpenAI-compatible API is stateless (each request re-sends the whole conversation): this
    is how an API client's multi-turn chat stays one conversation, and how asking the same thing
    again becomes a sibling answer that can be compared.
    """
    for i, turn in enumerate(turns):
        problem = text_problem(turn["content"])
        if problem:
            raise InvalidInput(f"turn {i}'s content {problem}")
    matched: list[UUID] = []
    paths: dict[UUID, list[UUID]] = {}  # last message id -> the matching path ending there
    async with conn.transaction(), conn.cursor(row_factory=tuple_row) as cur:
        for depth, turn in enumerate(turns):
            if depth == 0:
                await cur.execute(
                    """SELECT m.id, NULL FROM messages m JOIN conversations c ON c.id = m.conversation_id
                       WHERE c.user_id = %s AND m.parent_id IS NULL AND m.role = %s AND m.content = %s
                       ORDER BY c.updated_at DESC, m.created_at LIMIT 50""",
                    (user.id, turn["role"], turn["content"]),
                )
            else:
                await cur.execute(
                    """SELECT m.id, m.parent_id FROM messages m
                       JOIN conversations c ON c.id = m.conversation_id
                       WHERE c.user_id = %s AND m.parent_id = ANY(%s) AND m.role = %s AND m.content = %s
                       ORDER BY c.updated_at DESC, m.created_at LIMIT 50""",
                    (user.id, list(paths), turn["role"], turn["content"]),
                )
            paths = {row[0]: paths.get(row[1], []) + [row[0]] for row in await cur.fetchall()}
            if not paths:
                break
            # Dicts keep insertion order: the first is the most recently active conversation.
            matched = next(iter(paths.values()))
    return matched


# -- feedback ---------------------------------------------------------------------------------


async def record_rating(
    conn: psycopg.AsyncConnection,
    user: User,
    message_id: UUID | str,
    rating: int,
    reason: str | None = None,
    *,
    settings: StoreSettings | None = None,
) -> int:
    """Set the user's thumb (1 or -1) on an assistant answer; returns the vote's id.

    One current vote per user and message (a new thumb replaces the old one), and every vote is
    appended to rating_changes in the same transaction, so history is kept too.
    """
    message_id = parse_id(message_id, "message_id")
    if isinstance(rating, bool) or rating not in (1, -1):
        raise InvalidRating(rating)
    if reason is not None:
        limits = settings or _default_settings()
        _check_text(reason, "reason", limits.max_reason_chars, "max_reason_chars")
    # One statement (the server's busiest write): the ownership and role check feed the
    # upsert, and the history row is appended from what the upsert returned.
    async with conn.transaction():
        cur = await conn.execute(
            """WITH target AS (
                   SELECT m.id, m.role
                   FROM messages m JOIN conversations c ON c.id = m.conversation_id
                   WHERE m.id = %(message_id)s AND c.user_id = %(user_id)s),
               vote AS (
                   INSERT INTO ratings (message_id, user_id, rating, reason)
                   SELECT id, %(user_id)s, %(rating)s, %(reason)s
                   FROM target WHERE role = 'assistant'
                   ON CONFLICT (user_id, message_id) DO UPDATE
                   SET rating = EXCLUDED.rating, reason = EXCLUDED.reason, updated_at = now()
                   RETURNING id, rating, reason),
               history AS (
                   INSERT INTO rating_changes (rating_id, rating, reason)
                   SELECT id, rating, reason FROM vote)
               SELECT target.role, vote.id FROM target LEFT JOIN vote ON true""",
            {"message_id": message_id, "user_id": user.id, "rating": rating, "reason": reason},
        )
        row = await cur.fetchone()
    if row is None:
        raise NotFound("message", message_id)
    role, rating_id = row
    if rating_id is None:  # nothing was inserted: the target is not an answer
        raise NotAssistant(message_id, role)
    return rating_id


async def record_comparison(
    conn: psycopg.AsyncConnection,
    user: User,
    message_id: UUID | str,
    other_id: UUID | str,
    verdict: str,
) -> int:
    """Record "message_id is <verdict> than other_id" for two answers to the same prompt.

    One current verdict per user and unordered pair: comparing the same two again (in either
    order) replaces the verdict. Returns the comparison's id.
    """
    message_id = parse_id(message_id, "message_id")
    other_id = parse_id(other_id, "other_id")
    if verdict not in VERDICTS:
        raise InvalidVerdict(verdict)
    if message_id == other_id:
        raise SelfComparison(message_id)
    async with conn.transaction():
        first = await _owned_message(conn, user, message_id)
        second = await _owned_message(conn, user, other_id)
        for message in (first, second):
            if message.role != "assistant":
                raise NotAssistant(message.id, message.role)
        if (first.conversation_id, first.parent_id) != (second.conversation_id, second.parent_id):
            raise NotSibling(message_id, other_id)
        cur = await conn.execute(
            """INSERT INTO comparisons (message_id, other_id, user_id, verdict)
               VALUES (%s, %s, %s, %s)
               ON CONFLICT (user_id, LEAST(message_id, other_id), GREATEST(message_id, other_id))
               DO UPDATE SET message_id = EXCLUDED.message_id, other_id = EXCLUDED.other_id,
                             verdict = EXCLUDED.verdict, updated_at = now()
               RETURNING id""",
            (message_id, other_id, user.id, verdict),
        )
        row = await cur.fetchone()
    assert row is not None
    return row[0]


# -- edits: demonstrations and edited questions -----------------------------------------------


@dataclass(frozen=True)
class Demonstration:
    message: Message  # the edited answer: a sibling of `original` written by the user
    original: Message  # the answer it was edited from (kept, unchanged)
    comparison_id: int  # comparisons.id of "message is better than original", by that user


def _check_edit(
    message_id: object, content: object, settings: StoreSettings | None
) -> tuple[UUID, str]:
    """The input checks both kinds of edit share, before any SQL."""
    message_id = parse_id(message_id, "message_id")
    limits = settings or _default_settings()
    content = _check_text(content, "content", limits.max_message_chars, "max_message_chars")
    if not content.strip():
        raise EmptyContent("content")
    return message_id, content


async def _edit(
    conn: psycopg.AsyncConnection, user: User, message_id: UUID, content: str, role: str, how: str
) -> tuple[Message, Message]:
    """(original, edit): the sibling written by the user, after the checks that need the
    original. Runs inside the caller's transaction (a refusal here rolls it back)."""
    original = await _owned_message(conn, user, message_id)
    if original.role != role:
        raise WrongRole(message_id, original.role, role, how)
    if content == original.content:
        raise UnchangedEdit(message_id)
    await conn.execute(
        "UPDATE conversations SET updated_at = now() WHERE id = %s", (original.conversation_id,)
    )
    edit = await _one(
        conn,
        Message,
        f"""INSERT INTO messages AS m (conversation_id, parent_id, role, content, author_id,
                                       edited_from)
            VALUES (%s, %s, %s, %s, %s, %s) RETURNING {M}""",
        (original.conversation_id, original.parent_id, role, content, user.id, original.id),
    )
    assert edit is not None
    return original, edit


async def record_demonstration(
    conn: psycopg.AsyncConnection,
    user: User,
    message_id: UUID | str,
    content: str,
    *,
    settings: StoreSettings | None = None,
) -> Demonstration:
    """The user rewrote answer `message_id` into `content`, the answer they wanted.

    Stored as a sibling assistant message written by the user (author_id, edited_from; no
    model_version: no policy wrote it), and as the comparison "the edit is better than the
    original" by the user, in one transaction. The conversation continues from the edit like
    from any answer."""
    message_id, content = _check_edit(message_id, content, settings)
    async with conn.transaction():
        original, edit = await _edit(
            conn, user, message_id, content, "assistant",
            "only an answer takes a demonstration; a question you asked is edited as a new "
            "branch (edit_question; the websocket 'edit' frame does this and answers it)",
        )
        async with conn.cursor(row_factory=tuple_row) as cur:
            await cur.execute(
                """INSERT INTO comparisons (message_id, other_id, user_id, verdict)
                   VALUES (%s, %s, %s, 'better') RETURNING id""",
                (edit.id, original.id, user.id),
            )
            row = await cur.fetchone()
    assert row is not None
    return Demonstration(edit, original, row[0])


async def edit_question(
    conn: psycopg.AsyncConnection,
    user: User,
    message_id: UUID | str,
    content: str,
    *,
    settings: StoreSettings | None = None,
) -> Message:
    """The user rewrote their own question `message_id`: a sibling user message (a new branch;
    the old one stays reachable). The caller answers it (server/chat.py does, in the same
    transaction as this write)."""
    message_id, content = _check_edit(message_id, content, settings)
    async with conn.transaction():
        _, edit = await _edit(
            conn, user, message_id, content, "user",
            "an answer is edited as a demonstration (the answer you wanted: "
            "record_demonstration, or POST /api/messages/{id}/edit)",
        )
    return edit
