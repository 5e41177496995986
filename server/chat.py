"""One chat turn, shared by the websocket and the HTTP API.

A turn goes: check (model loaded, sampling bounds, length, rate limit, a free generation slot)
-> read the path root..parent (ownership checked) -> build the prompt from it, cut to the token
budget -> pick the conversation's model version (its own while it stays live; a new one gets
the canary for the canary's share of conversations, see serving.conversation_version) ->
submit it to the engine (which knows the model version from then on) -> store the user message
-> stream the answer -> store the answer (finish reason, token counts, model version, params)
under the id announced in `started`.

Everything that can refuse a turn is checked before it is committed: a new conversation, its
version and its first message are written in one transaction, so a refused turn leaves nothing
behind; the user's message is committed before the first token is sent.

How a turn ends is always recorded, one way for every cause:
- "stop" / "length": the model finished, or hit max_new_tokens (or, in theory, the longest
  answer the store takes, see Chat.answer_settings: the answer is cut there);
- "cancelled": a cancel frame, a closed websocket or a dropped HTTP stream. The partial answer
  (possibly empty) is stored with finish_reason "cancelled", so the tree shows what was seen;
- "error": the engine failed mid-answer; the partial answer is stored and the client is told.
What is stored of a cut answer is what the client received: a piece is kept once its consumer
has sent it on and asked for the next.

Storing the answer is retried while the database is unavailable (ANSWER_STORE_RETRY_S). If it
still cannot be stored, the turn stays as it was when the answer started - the user's message
stored, no answer under it - and the client is told exactly that (`answer_not_stored`).
Shutting down (server/shutdown.py) sets `draining`: no new turn starts, and `running` is what
the drain waits for.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from uuid import UUID

import psycopg

from feedback import store
from feedback.errors import AlreadyExists, InvalidInput, TooLong, WrongConversation
from feedback.store import Message, User

from . import serving
from .engine.base import InvalidSamplingParams, SamplingParams, TokenEvent, Usage
from .errors import (
    DB_RETRY_AFTER_S,
    AnswerNotStored,
    EngineFailed,
    InvalidParams,
    NothingToRegenerate,
    NotReady,
    ShuttingDown,
)
from .metrics import Metrics
from .quotas import Quotas
from .settings import ServerSettings

log = logging.getLogger(__name__)

MAX_CHARS_PER_TOKEN = 64  # generous: no real tokenizer's token decodes to more
TITLE_CHARS = 80  # conversation titles: the start of the first user message
# Model version recorded for assistant turns an API client supplies in its messages array:
# the stored path must hold them, but no policy of ours wrote them, so training can tell.
CLIENT_SUPPLIED = "client-supplied"
# Storing a finished answer while the database is away: the first retry comes quickly (a
# dropped connection is replaced at once), later ones back off to this.
STORE_RETRY_FIRST_DELAY_S = 0.25
STORE_RETRY_MAX_DELAY_S = 2.0


def resolve_params(settings: ServerSettings, asked: SamplingParams | None) -> SamplingParams:
    """The sampling parameters a turn uses: the asked ones within the settings' bounds (a
    refusal names the setting), the settings' defaults for the rest, as the engine computes
    them (a temperature or top_p too small to compute with is greedy: engine.base.GREEDY_EPS).
    What is returned is what is stored with the answer."""
    asked = asked or SamplingParams()
    if asked.temperature is not None and asked.temperature > settings.max_temperature:
        raise InvalidParams.over_limit(
            "temperature", asked.temperature, settings.max_temperature, "MAX_TEMPERATURE"
        )
    if asked.max_new_tokens is not None and asked.max_new_tokens > settings.max_new_tokens_limit:
        raise InvalidParams.over_limit(
            "max_new_tokens",
            asked.max_new_tokens,
            settings.max_new_tokens_limit,
            "MAX_NEW_TOKENS_LIMIT",
        )
    resolved = asked.with_defaults(
        settings.default_temperature, settings.default_top_p, settings.default_max_new_tokens
    )
    try:
        return resolved.checked(serving.sampling_limits(settings))
    except InvalidSamplingParams as exc:
        raise InvalidParams(str(exc)) from None


def _title(content: str) -> str:
    line = " ".join(content.split())
    return line if len(line) <= TITLE_CHARS else line[: TITLE_CHARS - 1].rstrip() + "…"


@dataclass
class Answer:
    """An answer being produced. `stream()` yields its text and stores it when it ends."""

    chat: Chat
    user: User
    conversation_id: UUID
    parent_id: UUID  # the message answered
    message_id: UUID  # the answer's id, announced before it is stored
    params: SamplingParams  # resolved: what the answer is generated (and stored) with
    prompt: serving.Prompt
    request: serving.EngineRequest  # the engine's side: knows its model version, yields events
    release: Callable[[], None]  # gives the generation slot back (idempotent)
    parts: list[str] = field(default_factory=list)
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: Exception | None = None
    stored: Message | None = None
    started_at: float = field(default_factory=time.monotonic)

    @property
    def model_version(self) -> str:
        return self.request.model_version

    @property
    def text(self) -> str:
        return "".join(self.parts)

    @property
    def usage(self) -> Usage:
        return Usage(prompt_tokens=self.prompt.n_tokens, completion_tokens=self.completion_tokens)

    async def stream(self) -> AsyncIterator[str]:
        """The answer's text as produced. However it ends - finished, cancelled (the consumer
        was cancelled or closed this iterator) or failed - the answer is stored before the
        iterator finishes, and `finish_reason` says which."""
        limit = self.chat.answer_settings.max_message_chars
        length = 0
        try:
            async for event in self.request:
                if isinstance(event, TokenEvent):
                    self.completion_tokens = event.completion_tokens
                    # A model can emit a NUL (a byte-level vocabulary has a token for it):
                    # PostgreSQL's text cannot hold one and a reader sees nothing of it, so it is
                    # dropped here, before the client and the store see the answer alike.
                    piece = event.text.replace("\x00", "")
                    if piece:
                        if not length and self.chat.metrics:
                            self.chat.metrics.time_to_first_token.observe(
                                time.monotonic() - self.started_at
                            )
                        text = piece[: limit - length]
                        if text:
                            length += len(text)
                            yield text
                            # Kept once the consumer asks for more, i.e. once it has sent this
                            # piece on: a stream cut mid-send stores what the client received.
                            self.parts.append(text)
                        if len(text) < len(piece):
                            # Longer than any answer may be stored: cut here, as max_new_tokens would.
                            log.warning("answer %s reached the %d-character limit for answers: cut there",
                                        self.message_id, limit)
                            self.finish_reason = "length"
                            break
                else:
                    self.finish_reason = event.finish_reason
                    self.completion_tokens = event.usage.completion_tokens
                    if event.error:
                        # The engine's account (torch's message, a remote's URL and reply) is
                        # for the operator's log; the client gets the typed error alone.
                        log.warning("answer %s: the engine failed: %s", self.message_id, event.error)
                        self.error = EngineFailed()
        except (asyncio.CancelledError, GeneratorExit):
            self.finish_reason = "cancelled"
            raise
        except Exception:  # the engine broke its own contract; keep what was said
            log.exception("answer %s failed", self.message_id)
            self.finish_reason = "error"
            self.error = EngineFailed()
        finally:
            self.request.cancel()  # frees the engine's slot now if we left early (idempotent)
            if self.finish_reason is None:
                self.finish_reason = "error"
                self.error = self.error or EngineFailed()
                log.warning("answer %s: the engine ended without a final event", self.message_id)
            try:
                # Shielded: a second cancellation (server shutting down) must not lose the row.
                await asyncio.shield(self._store())
            finally:
                self.release()

    async def run(self) -> str:
        """Generate the whole answer (non-streaming callers)."""
        async for _ in self.stream():
            pass
        return self.text

    def abandon(self) -> None:
        """Never streamed (the client left before): stop the engine, free the slot. Nothing is
        stored, as no part of the answer was produced for anyone. Harmless after `stream()`."""
        self.request.cancel()
        self.release()

    async def _store(self) -> None:
        """Store the answer under its announced id. While the database is unavailable the write
        is retried for ANSWER_STORE_RETRY_S; if it still fails, the turn stays as it was when the
        answer started (the user's message stored, no answer under it: the one documented
        state of an answer that could not be kept) and `error` says exactly that."""
        started = time.monotonic()
        delay = STORE_RETRY_FIRST_DELAY_S
        while True:
            try:
                self.stored = await self._write()
                break
            except AlreadyExists:
                # An earlier attempt committed but its connection broke before it said so.
                async with self.chat.pool.connection() as conn:
                    self.stored = await store.get_message(conn, self.user, self.message_id)
                break
            except psycopg.OperationalError as exc:
                waited = time.monotonic() - started
                if waited + delay > self.chat.settings.answer_store_retry_s:
                    log.error("answer %s not stored: the database stayed unavailable for %.1f s (%s)",
                              self.message_id, waited, exc)
                    self._not_stored(f"the database was unavailable for {waited:.0f} s")
                    return
                log.warning("answer %s: the database is unavailable (%s); retrying in %.2f s",
                            self.message_id, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, STORE_RETRY_MAX_DELAY_S)
            except Exception as exc:
                log.exception("could not store answer %s", self.message_id)
                self._not_stored(f"storing it failed ({type(exc).__name__})")
                return
        if self.chat.metrics:
            self.chat.metrics.answers.labels(self.finish_reason, self.model_version).inc()
            self.chat.metrics.answer_tokens.labels(self.model_version).inc(self.completion_tokens)

    def _not_stored(self, why: str) -> None:
        self.finish_reason = "error"
        self.error = AnswerNotStored(self.message_id, self.parent_id, why, DB_RETRY_AFTER_S)

    async def _write(self) -> Message:
        async with self.chat.pool.connection() as conn:
            return await store.add_message(
                conn,
                self.user,
                self.conversation_id,
                self.parent_id,
                "assistant",
                self.text,
                model_version=self.model_version,
                prompt_tokens=self.prompt.n_tokens,
                completion_tokens=self.completion_tokens,
                finish_reason=self.finish_reason,
                params=self.params.model_dump(),
                message_id=self.message_id,
                settings=self.chat.answer_settings,
            )


class Chat:
    """The turn logic, with the pool, engine, settings and quotas it needs."""

    def __init__(
        self, pool, engine, settings: ServerSettings, quotas: Quotas, metrics: Metrics | None = None
    ):
        self.pool = pool
        self.metrics = metrics
        self.engine = engine
        self.settings = settings
        self.quotas = quotas
        # Answers started and not yet stored (or abandoned), by id: what a shutdown waits for.
        self.running: dict[UUID, Answer] = {}
        # Set on SIGTERM (server/shutdown.py): no new turn starts; running ones finish.
        self.draining = False
        # The swap controller (server/swap.py) once the app starts one: the registry's state it
        # last heard decides which version a conversation runs on. None: the engine's default.
        self.swaps = None
        # MAX_MESSAGE_CHARS limits what people send; an answer is bounded by its token budget
        # instead and must always be storable, so the store gets a limit the budget cannot
        # reach, and an answer that reaches it anyway (an engine that ignores max_new_tokens,
        # tokens longer than MAX_CHARS_PER_TOKEN) is cut there: finish_reason "length".
        self.answer_settings = settings.model_copy(
            update={
                "max_message_chars": max(
                    settings.max_message_chars, settings.max_new_tokens_limit * MAX_CHARS_PER_TOKEN
                )
            }
        )

    # -- starting a turn ------------------------------------------------------------------------
    # Order in every start_*: checks that need no database (engine ready, params, length, rate,
    # a free slot), then read the path, build the prompt, submit to the engine (which refuses an
    # unknown version or an overload at once), and only then write, in one transaction. A
    # failure at any step gives back what was taken (slot, engine request) and writes nothing:
    # `_starting` does that part for all of them.

    def _ready_engine(self):
        if self.draining:
            raise ShuttingDown()
        if not serving.is_ready(self.engine):
            raise NotReady()
        return self.engine

    def _version_for(self, key: UUID | str | None, assigned: str | None) -> str:
        """Chosen right before submitting, with no await in between, so the version cannot be
        unloaded in the meantime."""
        state = self.swaps.state if self.swaps is not None else None
        return serving.conversation_version(self.engine, state, key, assigned)

    def _check_length(self, content: str) -> None:
        if len(content) > self.settings.max_message_chars:
            raise TooLong("content", len(content), self.settings.max_message_chars, "max_message_chars")

    @contextlib.asynccontextmanager
    async def _starting(
        self, user: User, *, transaction: bool = True
    ) -> AsyncIterator[tuple[psycopg.AsyncConnection, _Start]]:
        """Where every start_* does its database part: counts against the rate limit, takes a
        generation slot, then yields a connection (in one transaction unless told otherwise) and
        the `_Start` to submit with. If anything fails before the block has ended (and the
        transaction committed), the submitted request is cancelled and the slot given back."""
        await self.quotas.hit(user.id)
        start = _Start(self.quotas.take_slot(user.id))
        try:
            async with self.pool.connection() as conn:
                async with conn.transaction() if transaction else contextlib.nullcontext():
                    yield conn, start
        except BaseException:
            if start.request is not None:
                start.request.cancel()
            start.release()
            raise

    async def start_message(
        self,
        user: User,
        conversation_id: UUID | None,
        parent_id: UUID | None,
        content: str,
        asked: SamplingParams | None = None,
    ) -> Answer:
        """Store the user's message and start its answer (the 'message' frame)."""
        engine = self._ready_engine()
        params = resolve_params(self.settings, asked)
        self._check_length(content)
        if conversation_id is None and parent_id is not None:
            raise InvalidInput(
                "parent_id was given without conversation_id: send the conversation_id the "
                "parent belongs to, or neither to start a new conversation"
            )
        async with self._starting(user) as (conn, start):
            if conversation_id is None:
                path: list[Message] = []
            elif parent_id is None:
                newest = await store.newest_message(conn, user, conversation_id)
                path = [] if newest is None else await store.path_to_root(conn, user, newest.id)
            else:
                path = await store.path_to_root(conn, user, parent_id)
                if path[-1].conversation_id != conversation_id:
                    raise WrongConversation(parent_id, conversation_id)
            turns = _turns(path) + [{"role": "user", "content": content}]
            prompt = serving.prompt_for(engine, self.settings, turns, params)
            if conversation_id is None:
                # Created first: a new conversation's version is chosen by its id. A
                # refusal below rolls it back with the rest of the transaction.
                conversation = await store.create_conversation(
                    conn, user, _title(content), settings=self.settings
                )
                conversation_id, assigned = conversation.id, None
            else:
                assigned = await _assigned_version(conn, conversation_id)
            request = start.submit(
                engine, prompt, params, self._version_for(conversation_id, assigned)
            )
            await _remember_version(conn, conversation_id, assigned, request.model_version)
            question = await store.add_message(
                conn,
                user,
                conversation_id,
                path[-1].id if path else None,
                "user",
                content,
                settings=self.settings,
            )
        return self._answer(user, question, params, prompt, start)

    async def start_regenerate(
        self, user: User, message_id: UUID, asked: SamplingParams | None = None
    ) -> Answer:
        """Start another answer to the message `message_id` answered (the 'regenerate' frame):
        the same prompt, and the new answer is stored as a sibling of `message_id`."""
        engine = self._ready_engine()
        params = resolve_params(self.settings, asked)
        async with self._starting(user, transaction=False) as (conn, start):
            path = await store.path_to_root(conn, user, message_id)
            answer = path[-1]
            if answer.role != "assistant" or len(path) < 2:
                raise NothingToRegenerate(
                    f"message {message_id} is a {answer.role} message: regenerate takes the "
                    "id of an assistant answer, and the new answer becomes its sibling"
                )
            question = path[-2]
            prompt = serving.prompt_for(engine, self.settings, _turns(path[:-1]), params)
            assigned = await _assigned_version(conn, answer.conversation_id)
            request = start.submit(
                engine, prompt, params, self._version_for(answer.conversation_id, assigned)
            )
            await _remember_version(conn, answer.conversation_id, assigned, request.model_version)
        return self._answer(user, question, params, prompt, start)

    async def start_edit_question(
        self, user: User, message_id: UUID, content: str, asked: SamplingParams | None = None
    ) -> Answer:
        """Edit the user's own question `message_id` into `content` and answer it (the 'edit'
        frame on a user message): the edit is a sibling question, a new branch; the old branch
        stays. The edit is written first inside the turn's transaction (it is the prompt's last
        turn), so a refusal anywhere later still leaves nothing behind."""
        engine = self._ready_engine()
        params = resolve_params(self.settings, asked)
        self._check_length(content)
        async with self._starting(user) as (conn, start):
            question = await store.edit_question(conn, user, message_id, content, settings=self.settings)
            path = await store.path_to_root(conn, user, question.id)
            prompt = serving.prompt_for(engine, self.settings, _turns(path), params)
            assigned = await _assigned_version(conn, question.conversation_id)
            request = start.submit(
                engine, prompt, params, self._version_for(question.conversation_id, assigned)
            )
            await _remember_version(conn, question.conversation_id, assigned, request.model_version)
        return self._answer(user, question, params, prompt, start)

    async def start_from_messages(
        self,
        user: User,
        messages: list[dict[str, str]],
        asked: SamplingParams | None,
        model: str | None,
    ) -> Answer:
        """An API request (see openai_api's module doc): its messages array is found among the
        user's stored paths or stored as one, and the answer is appended at its end. `model`
        None ("default") runs where the canary decision says (see `_api_version`); a named one
        must be served here."""
        engine = self._ready_engine()
        named = None if model is None else serving.pick_version(engine, model)
        params = resolve_params(self.settings, asked)
        for m in messages:
            self._check_length(m["content"])
        prompt = serving.prompt_for(engine, self.settings, messages, params)
        async with self._starting(user) as (conn, start):
            place = await _api_place(conn, user, messages)
            assigned = None if place.conversation_id is None else await _assigned_version(
                conn, place.conversation_id
            )
            version = named or self._api_version(user, place.conversation_id, assigned)
            request = start.submit(engine, prompt, params, version)
            question = await self._store_api_path(conn, user, place, messages)
            await _remember_version(conn, question.conversation_id, assigned, request.model_version)
        return self._answer(user, question, params, prompt, start)

    def _api_version(self, user: User, conversation_id: UUID | None, assigned: str | None) -> str:
        """The version an API request for "default" runs on. A conversation the client continues
        keeps its version, as over the websocket; otherwise deploy.canary chooses on a key of
        the client (its user), not of the request: API clients re-send whole conversations and
        often start new ones, and one client should see one policy, not a mix."""
        if assigned is not None:
            return self._version_for(conversation_id, assigned)
        return self._version_for(api_client_key(user), None)

    async def _store_api_path(self, conn, user: User, place: _ApiPlace, messages: list[dict[str, str]]) -> Message:
        """The stored message the answer goes under, writing what is not stored yet."""
        if place.question is not None:
            return place.question  # the same conversation asked again: a sibling answer
        conversation_id, parent_id = place.conversation_id, place.parent_id
        if conversation_id is None:
            first_user = next((m["content"] for m in messages if m["role"] == "user"), "")
            conversation = await store.create_conversation(
                conn, user, _title(first_user), settings=self.settings
            )
            conversation_id = conversation.id
        parent = None
        for m in place.new:
            parent = await store.add_message(
                conn,
                user,
                conversation_id,
                parent_id,
                m["role"],
                m["content"],
                model_version=CLIENT_SUPPLIED if m["role"] == "assistant" else None,
                settings=self.settings,
            )
            parent_id = parent.id
        assert parent is not None
        return parent

    def _answer(self, user: User, question: Message, params, prompt, start: _Start) -> Answer:
        message_id = uuid.uuid4()

        def done() -> None:  # called once stored, or abandoned (idempotent)
            self.running.pop(message_id, None)
            start.release()

        answer = Answer(
            chat=self,
            user=user,
            conversation_id=question.conversation_id,
            parent_id=question.id,
            message_id=message_id,
            params=params,
            prompt=prompt,
            request=start.request,
            release=done,
        )
        self.running[message_id] = answer
        return answer

    # -- feedback -------------------------------------------------------------------------------

    async def feedback(self, user: User, message_id: UUID | str, rating: int, reason: str | None) -> int:
        await self.quotas.hit(user.id)
        async with self.pool.connection() as conn:
            rating_id = await store.record_rating(
                conn, user, message_id, rating, reason, settings=self.settings
            )
        if self.metrics:
            self.metrics.feedback.labels("thumb_up" if rating == 1 else "thumb_down").inc()
        return rating_id

    async def compare(
        self, user: User, message_id: UUID | str, other_id: UUID | str, verdict: str
    ) -> int:
        await self.quotas.hit(user.id)
        async with self.pool.connection() as conn:
            comparison_id = await store.record_comparison(conn, user, message_id, other_id, verdict)
        if self.metrics:
            self.metrics.feedback.labels("compare").inc()
        return comparison_id

    async def demonstrate(self, user: User, message_id: UUID | str, content: str) -> store.Demonstration:
        """The user rewrote an answer into the one they wanted (see store.record_demonstration)."""
        await self.quotas.hit(user.id)
        async with self.pool.connection() as conn:
            demonstration = await store.record_demonstration(
                conn, user, message_id, content, settings=self.settings
            )
        if self.metrics:
            self.metrics.feedback.labels("demonstration").inc()
        return demonstration

    async def edit(
        self, user: User, message_id: UUID, content: str, asked: SamplingParams | None
    ) -> store.Demonstration | Answer:
        """The websocket's 'edit' frame: a demonstration on an answer, a new answered branch on
        the user's own question (anything else: the store's wrong_role)."""
        async with self.pool.connection() as conn:
            original = await store.get_message(conn, user, message_id)
        if original.role == "user":
            return await self.start_edit_question(user, message_id, content, asked)
        if asked is not None:
            raise InvalidInput(
                "params apply only to the answer of an edited question: an edited answer is "
                "stored as written, nothing is generated; drop params"
            )
        return await self.demonstrate(user, message_id, content)


def api_client_key(user: User) -> str:
    """What the canary decision hashes for an API client's new conversations: its user, so the
    same client keeps getting the same version (the same on every replica)."""
    return f"user:{user.id}"


@dataclass
class _Start:
    """A turn being started (Chat._starting): its generation slot, and its engine request once
    submitted, both given back if the start fails."""

    release: Callable[[], None]  # gives the generation slot back (idempotent)
    request: serving.EngineRequest | None = None  # None until submitted

    def submit(self, engine, prompt: serving.Prompt, params: SamplingParams, version: str) -> serving.EngineRequest:
        """serving.submit, remembering the request so a failed start cancels it."""
        self.request = serving.submit(engine, prompt, params, version)
        return self.request


@dataclass(frozen=True)
class _ApiPlace:
    """Where an API request's messages array lives in the user's tree (openai_api's module doc)."""

    conversation_id: UUID | None  # None: a new conversation holding every message
    parent_id: UUID | None  # the stored message the new ones continue
    new: list[dict[str, str]]  # the messages to store under it
    question: Message | None = None  # found whole (the same question again): the answer's parent


async def _api_place(conn, user: User, messages: list[dict[str, str]]) -> _ApiPlace:
    prefix = await store.find_path(conn, user, messages)
    if len(prefix) == len(messages):
        question = await store.get_message(conn, user, prefix[-1])
        return _ApiPlace(question.conversation_id, question.id, [], question)
    if prefix and len(prefix) == len(messages) - 1 and messages[-2]["role"] == "assistant":
        # The client continues a stored conversation (it re-sent our last answer).
        last = await store.get_message(conn, user, prefix[-1])
        return _ApiPlace(last.conversation_id, last.id, messages[-1:])
    return _ApiPlace(None, None, messages)


# A conversation's version (conversations.model_version, see deploy/canary.py): the one its
# answers run on, kept while it stays live (feedback.store.conversation_version).


async def _assigned_version(conn, conversation_id: UUID) -> str | None:
    """The version the conversation runs on (ownership is checked by the caller's reads)."""
    return await store.conversation_version(conn, conversation_id)


async def _remember_version(conn, conversation_id: UUID, assigned: str | None, ran: str) -> None:
    """Store what actually runs (not what the canary chose: this replica may lack it), so the
    conversation's later answers come from the same policy while it stays live."""
    if ran != assigned:
        await store.set_conversation_version(conn, conversation_id, ran)


def _turns(path: list[Message]) -> list[dict[str, str]]:
    return [{"role": m.role, "content": m.content} for m in path]

