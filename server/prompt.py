"""The prompt for an answer: the conversation path rendered with the model's chat template,
cut to the token budget.

The path is the list of messages from the root to the message being answered. The budget is
the context length minus the answer's max_new_tokens. When the rendered path is over budget,
whole turns are dropped oldest first; the system prompt and the newest user turn (with
anything after it) are never dropped. If even those do not fit, `PromptTooLong` says by how
much, so the server can tell the user to shorten the message or ask for fewer new tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

ROLES = ("system", "user", "assistant")


class PromptTooLong(ValueError):
    """The system prompt plus the newest user turn alone exceed the token budget."""

    def __init__(self, n_tokens: int, budget: int, context_length: int, max_new_tokens: int):
        super().__init__(
            f"the message needs {n_tokens} prompt tokens but only {budget} fit "
            f"(context length {context_length} minus max_new_tokens {max_new_tokens}): "
            "shorten the message or ask for fewer new tokens"
        )
        self.n_tokens = n_tokens
        self.budget = budget


class InvalidConversation(ValueError):
    """The path is not a list of {role, content} messages ending in a user turn."""


@dataclass(frozen=True)
class Prompt:
    """What an engine is given: the kept messages (for engines that take a chat, like the
    OpenAI API) and their rendering as token ids (for engines that take tokens)."""

    messages: tuple[dict[str, str], ...]  # kept messages, root first (system prompt included)
    token_ids: tuple[int, ...]  # the chat template's rendering, generation prompt included
    dropped_messages: int = 0  # oldest messages cut to fit the budget

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)


def render(tokenizer: Any, messages: Sequence[dict[str, str]]) -> list[int]:
    """Token ids of `messages` through the chat template, ready for the assistant's answer."""
    ids = tokenizer.apply_chat_template(
        list(messages), add_generation_prompt=True, tokenize=True, return_dict=False
    )
    if hasattr(ids, "keys"):  # some tokenizers return a BatchEncoding regardless
        ids = ids["input_ids"]
    return [int(i) for i in ids]


def build_prompt(
    path: Sequence[dict[str, Any]],
    tokenizer: Any,
    *,
    context_length: int,
    max_new_tokens: int,
    system_prompt: str | None = None,
) -> Prompt:
    """The prompt for answering the last user turn of `path` within the token budget.

    `system_prompt` is prepended when the path does not start with a system message.
    """
    messages = _validated(path)
    if system_prompt and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system_prompt})
    budget = context_length - max_new_tokens
    if budget <= 0:
        raise PromptTooLong(0, budget, context_length, max_new_tokens)

    head = 1 if messages[0]["role"] == "system" else 0  # kept whatever the budget
    newest_user = max(i for i, m in enumerate(messages) if m["role"] == "user")
    # Cutting points: keep messages[cut:newest_user] of the history. A cut at a user message
    # drops whole turns (a question with its answer), so the kept history opens with a question.
    cuts = [i for i in range(head, newest_user) if messages[i]["role"] == "user"] + [newest_user]

    def rendered(cut: int) -> list[int]:
        return render(tokenizer, messages[:head] + messages[cut:])

    ids = rendered(cuts[0])
    if len(ids) <= budget:
        return Prompt(tuple(messages), tuple(ids), 0)
    # Fewer kept turns never make the prompt longer: binary-search the first cut that fits.
    low, high = 1, len(cuts) - 1
    best = None
    while low <= high:
        middle = (low + high) // 2
        candidate = rendered(cuts[middle])
        if len(candidate) <= budget:
            best, high = (cuts[middle], candidate), middle - 1
        else:
            low = middle + 1
    if best is None:
        n_tokens = len(rendered(newest_user))
        raise PromptTooLong(n_tokens, budget, context_length, max_new_tokens)
    cut, ids = best
    kept = messages[:head] + messages[cut:]
    return Prompt(tuple(kept), tuple(ids), dropped_messages=cut - head)


def _validated(path: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
    if not path:
        raise InvalidConversation("the conversation is empty: there is nothing to answer")
    messages = []
    for index, message in enumerate(path):
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise InvalidConversation(f"message {index} has role {role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise InvalidConversation(f"message {index} has no text content")
        if role == "system" and index != 0:
            raise InvalidConversation(f"message {index} is a system message; only the first may be")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "user" for m in messages):
        raise InvalidConversation("the conversation has no user message to answer")
    return messages
