"""Where an API request's `messages` array already lives in the store, if anywhere.

The OpenAI API is stateless: each request re-sends the whole conversation. To keep an API
user's multi-turn chat as one conversation (and to make "ask the same thing again" produce a
sibling answer that can be compared), the server looks for the array among the user's stored
paths: root first, each message a child of the previous one, same role and same content.

(This read belongs in feedback/store.py; it lives here until the store grows `find_path`.)
"""

from __future__ import annotations

from uuid import UUID

from feedback.store import User


async def stored_prefix(conn, user: User, turns: list[dict[str, str]]) -> list[UUID]:
    """Ids of the longest stored path matching the start of `turns` (the most recently active
    conversation's when several match); [] when not even the first message matches."""
    matched: list[UUID] = []
    paths: dict[UUID, list[UUID]] = {}  # last message id -> the matching path ending there
    for depth, turn in enumerate(turns):
        if depth == 0:
            cur = await conn.execute(
                """SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id
                   WHERE c.user_id = %s AND m.parent_id IS NULL AND m.role = %s AND m.content = %s
                   ORDER BY c.updated_at DESC, m.created_at LIMIT 50""",
                (user.id, turn["role"], turn["content"]),
            )
            rows = await cur.fetchall()
            paths = {row[0]: [row[0]] for row in rows}
        else:
            cur = await conn.execute(
                """SELECT m.id, m.parent_id FROM messages m
                   JOIN conversations c ON c.id = m.conversation_id
                   WHERE c.user_id = %s AND m.parent_id = ANY(%s) AND m.role = %s AND m.content = %s
                   ORDER BY c.updated_at DESC, m.created_at LIMIT 50""",
                (user.id, list(paths), turn["role"], turn["content"]),
            )
            rows = await cur.fetchall()
            paths = {row[0]: paths[row[1]] + [row[0]] for row in rows}
        if not paths:
            break
        # Dicts keep insertion order: the first is the most recently active conversation.
        matched = next(iter(paths.values()))
    return matched
