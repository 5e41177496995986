"""Every way the store refuses a request: one class per failure, each with a wire code.

The server turns any `StoreError` into `{"type": "error", "code": err.code, "message": str(err)}`
on the websocket and into `err.http_status` over HTTP, so `code` is part of the public contract
(short snake_case, never renamed) and the message tells a person what to change.

Another user's conversation or message is answered with `NotFound`, exactly as an id that does
not exist: a `Forbidden` there would confirm to a stranger that the id is real.
"""

from __future__ import annotations

from typing import ClassVar
from uuid import UUID


class StoreError(Exception):
    """Base of every refusal; nothing was written when one is raised."""

    code: ClassVar[str] = "store_error"
    http_status: ClassVar[int] = 400

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def to_wire(self) -> dict[str, str]:
        """The body of a websocket error frame or an HTTP error response."""
        return {"code": self.code, "message": self.message}


class InvalidId(StoreError):
    code = "invalid_id"
    http_status = 400

    def __init__(self, field: str, value: object) -> None:
        super().__init__(
            f"{field} {value!r} is not a valid id: ids are UUIDs such as "
            "'0b8e7f4c-2f1a-4c3e-9a57-6d1f0a3b9c21', as returned in 'started' frames"
        )
        self.field = field


class NotFound(StoreError):
    """Unknown id, or an id that belongs to another user (deliberately indistinguishable)."""

    code = "not_found"
    http_status = 404

    def __init__(self, kind: str, id: UUID | str) -> None:
        super().__init__(
            f"no {kind} {id} among yours: check the id, and that you are using the same "
            "token that created it"
        )
        self.kind = kind
        self.id = id


class Forbidden(StoreError):
    """For the server's own access rules (e.g. anonymous users where they are not admitted).

    The store itself never raises it: other users' data is `NotFound` (see the module doc).
    """

    code = "forbidden"
    http_status = 403


class InvalidToken(StoreError):
    code = "invalid_token"
    http_status = 401


class InvalidInput(StoreError):
    """A field has a value the store does not accept; subclasses name the common cases."""

    code = "invalid_input"
    http_status = 422


class InvalidRating(InvalidInput):
    code = "invalid_rating"

    def __init__(self, rating: object) -> None:
        super().__init__(
            f"rating {rating!r} is not accepted: send 1 (thumbs up) or -1 (thumbs down)"
        )


class InvalidVerdict(InvalidInput):
    code = "invalid_verdict"

    def __init__(self, verdict: object) -> None:
        super().__init__(
            f"verdict {verdict!r} is not accepted: send 'better' (message_id is better than "
            "other_id), 'worse' or 'same'"
        )


class NotAssistant(InvalidInput):
    code = "not_assistant"

    def __init__(self, message_id: UUID, role: str) -> None:
        super().__init__(
            f"message {message_id} is a {role} message: feedback and comparisons apply only to "
            "assistant answers"
        )


class SelfComparison(InvalidInput):
    code = "self_comparison"

    def __init__(self, message_id: UUID) -> None:
        super().__init__(
            f"message {message_id} was compared with itself: other_id must be a different "
            "answer to the same prompt (regenerate to get one)"
        )


class NotSibling(InvalidInput):
    code = "not_sibling"

    def __init__(self, message_id: UUID, other_id: UUID) -> None:
        super().__init__(
            f"messages {message_id} and {other_id} answer different prompts: only answers to the "
            "same message (regenerations of each other) can be compared"
        )


class WrongConversation(InvalidInput):
    code = "wrong_conversation"

    def __init__(self, parent_id: UUID, conversation_id: UUID) -> None:
        super().__init__(
            f"parent message {parent_id} is not in conversation {conversation_id}: send the "
            "conversation_id the parent belongs to, or omit parent_id to continue from the "
            "newest message"
        )


class TooLong(StoreError):
    code = "too_long"
    http_status = 413

    def __init__(self, field: str, length: int, limit: int, setting: str) -> None:
        super().__init__(
            f"{field} is {length} characters long, over the limit of {limit}: shorten it "
            f"(operators can raise {setting.upper()})"
        )
        self.field = field
        self.limit = limit


class AlreadyExists(StoreError):
    code = "already_exists"
    http_status = 409

    def __init__(self, kind: str, id: UUID) -> None:
        super().__init__(f"a {kind} with id {id} already exists: use a fresh id or none")


class WrongRole(InvalidInput):
    """An edit sent down the path of the other role: an answer's edit is a demonstration, a
    question's edit is a new branch (and system prompts are not edited)."""

    code = "wrong_role"

    def __init__(self, message_id: UUID, role: str, expected: str, how: str) -> None:
        super().__init__(
            f"message {message_id} is a {role} message, not a{'n' if expected[0] in 'aeiou' else ''} "
            f"{expected} message: {how}"
        )
        self.role = role
        self.expected = expected


class EmptyContent(InvalidInput):
    code = "empty_content"

    def __init__(self, field: str) -> None:
        super().__init__(f"{field} is empty (or only whitespace): send the text you want instead")


class UnchangedEdit(InvalidInput):
    code = "unchanged_edit"

    def __init__(self, message_id: UUID) -> None:
        super().__init__(
            f"the edit of message {message_id} is the same text as the message: change it, or "
            "rate the message with a thumb instead"
        )
