"""Persona chat over REST: a JSON answer or an SSE stream, and the recorded conversations.

Refusals (unknown persona, bad messages, a prompt over budget, a busy engine) are
found before the first token, so a stream that starts is a 200 whose events end
with ``done`` or, if generation fails midway, ``error``. A client that closes the
stream cancels generation (Litestar cancels the response on ``http.disconnect``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPI
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK
from prometheus_client.registry import Collector

from genome_service.api.conventions import Page, command_metadata
from genome_service.api.openapi import SSE, document_json_or_sse
from genome_service.api.resources import MAX_PAGE, caller_of, page, visible_row
from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.turn import ChatRefused, Reply, TurnRequest, run_turn
from genome_service.domain.conversation import Generation, Message
from genome_service.projections.columns import utc
from genome_service.projections.queries import child_rows
from genome_service.projections.sealed_columns import open_value
from genome_service.projections.tables import ConversationMessageRow, ConversationRow, PersonaRow
from genome_service.services.bootstrap import Services
from genome_service.settings import Settings
from inference.backends.base import Token

PERSONAS = PersonaRow.__table__  # type: ignore[attr-defined]
CONVERSATIONS = ConversationRow.__table__  # type: ignore[attr-defined]
MESSAGES = ConversationMessageRow.__table__  # type: ignore[attr-defined]


class ChatMessageIn(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    messages: list[ChatMessageIn] = []
    conversation_id: str | None = None
    stream: bool = False
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    context_k: int | None = None


class ChatAnswer(msgspec.Struct, frozen=True):
    conversation_id: str
    message: Message
    generation: Generation


class ConversationSummary(msgspec.Struct, frozen=True):
    id: str
    persona_id: str
    message_count: int
    version: int
    created_at: datetime
    updated_at: datetime


class ConversationDetail(msgspec.Struct, frozen=True):
    id: str
    persona_id: str
    messages: list[Message]
    version: int
    created_at: datetime
    updated_at: datetime


def asked_messages(settings: Settings, messages: list[ChatMessageIn]) -> tuple[Message, ...]:
    """The caller's messages; a `system` one is refused or demoted to user text (GENOME_CHAT_SYSTEM_MESSAGES):
    only the persona's own system prompt speaks as the system."""
    asked = []
    for message in messages:
        if message.role == "system":
            if settings.chat_system_messages == "refuse":
                raise ChatRefused(422, "system_message_refused",
                                  "a request cannot set the system prompt: it is the persona's; send user messages")
            asked.append(Message("user", message.content))
        else:
            asked.append(Message(message.role, message.content))
    return tuple(asked)


def turn_request(settings: Settings, persona_id: str, owner: str, data: ChatCreate) -> TurnRequest:
    max_tokens = settings.chat_default_max_tokens if data.max_tokens is None else data.max_tokens
    if not 1 <= max_tokens <= settings.chat_max_tokens_limit:
        raise ChatRefused(422, "max_tokens_out_of_range", f"max_tokens must be within 1..{settings.chat_max_tokens_limit} (got {max_tokens})")
    context_k = settings.chat_context_k if data.context_k is None else data.context_k
    if not 0 <= context_k <= settings.search_max_k:
        raise ChatRefused(422, "context_k_out_of_range", f"context_k must be within 0..{settings.search_max_k} (got {context_k})")
    return TurnRequest(
        persona_id=persona_id, owner=owner, messages=asked_messages(settings, data.messages),
        conversation_id=data.conversation_id, max_tokens=max_tokens, temperature=data.temperature,
        top_p=data.top_p, seed=data.seed, context_k=context_k,
    )  # fmt: skip


async def start_turn(
    request: Request[Any, Any, Any], services: Services, chat: ChatRuntime, persona_id: str, turn: TurnRequest,
) -> tuple[Token | Reply, AsyncIterator[Token | Reply]]:
    """The turn's first event and the rest: every refusal is raised here, before a response starts."""
    visible_row(services, PERSONAS, "persona_id", persona_id, caller_of(request), "persona")
    events = run_turn(services, chat, turn, command_metadata(request, turn.owner, services.data_keys))
    return await anext(events), events


async def finished(first: Token | Reply, events: AsyncIterator[Token | Reply]) -> Reply:
    event = first
    while not isinstance(event, Reply):
        event = await anext(events)
    if event.failure is not None:
        raise event.failure
    return event


class ChatController(Controller):
    tags = ["chat"]

    # The handler's media type is the stream's: Litestar lets it override a Stream's own, while a
    # plain Response keeps the JSON type it is given. `document_chat` documents both.
    @post("/personas/{persona_id:str}/chat", operation_id="chat", status_code=HTTP_200_OK, media_type=SSE)
    async def chat(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], chat: NamedDependency[ChatRuntime],
        persona_id: FromPath[str], data: JSONBody[ChatCreate],
    ) -> Response[ChatAnswer]:
        """Ask the persona: a JSON answer, or with `stream` SSE `token` events then `done` (citations, usage, finish)."""
        turn = turn_request(services.settings, persona_id, caller_of(request).owner, data)
        first, events = await start_turn(request, services, chat, persona_id, turn)
        if data.stream:
            return ServerSentEvent(sse_events(first, events))
        reply = await finished(first, events)
        return Response(ChatAnswer(reply.conversation_id, Message("assistant", reply.content), reply.generation), media_type=MediaType.JSON)

    @get("/personas/{persona_id:str}/conversations", operation_id="listConversations", sync_to_thread=False)
    def list(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50, cursor: FromQuery[str | None] = None,
    ) -> Page:
        """The caller's conversations with the persona, oldest first, a page at a time."""
        caller = caller_of(request)
        # An archived persona's conversations stay readable; an erased one's are gone (410).
        visible_row(services, PERSONAS, "persona_id", persona_id, caller, "persona", archived_column="erased")
        where = [CONVERSATIONS.c.owner == caller.owner, CONVERSATIONS.c.persona_id == persona_id]
        rows, next_cursor = page(services, CONVERSATIONS, "conversation_id", where, cursor, limit)
        return Page([ConversationSummary(r["conversation_id"], r["persona_id"], r["message_count"], r["version"],
                                         r["created_at"], r["updated_at"]) for r in rows], next_cursor)

    @get("/conversations/{conversation_id:str}", operation_id="getConversation", sync_to_thread=False)
    def read(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], conversation_id: FromPath[str],
    ) -> ConversationDetail:
        """One conversation and every message, with how each reply was generated."""
        with services.database.read() as connection:
            row = visible_row(services, CONVERSATIONS, "conversation_id", conversation_id, caller_of(request),
                              "conversation", archived_column=None, connection=connection)
            messages = child_rows(connection, MESSAGES, "conversation_id", [conversation_id], "ordinal")
            key = services.data_keys.for_reading(connection, [row["persona_id"]])[row["persona_id"]]
        return ConversationDetail(
            conversation_id, row["persona_id"],
            [Message(m["role"], open_value(key, MESSAGES, m, "content") or "", _generation(m["generation"])) for m in messages],
            row["version"], utc(row["created_at"]), utc(row["updated_at"]),
        )


def document_chat(schema: OpenAPI, path: str = "/personas/{persona_id}/chat") -> None:
    document_json_or_sse(schema, path, "post", "Server-sent events: see the README's chat section")


def _generation(stored: str | dict[str, Any] | None) -> Generation | None:
    # Read on the driver: SQLite hands back JSON text, psycopg a decoded object.
    if isinstance(stored, str):
        return msgspec.json.decode(stored, type=Generation | None)
    return msgspec.convert(stored, Generation | None)


class EngineCollector(Collector):
    """The chat engine's metrics (queue, tokens, finished requests by reason) on /metrics, once loaded."""

    def __init__(self, runtime: ChatRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Any:
        engine = self.runtime.engine
        if engine is not None:
            yield from engine.metrics.registry.collect()


async def sse_events(first: Token | Reply, events: AsyncIterator[Token | Reply]) -> AsyncIterator[ServerSentEventMessage]:
    """`token` events as they come, then `done` with the recorded turn, or `error` if generation failed."""
    try:
        event = first
        while True:
            if isinstance(event, Token):
                yield ServerSentEventMessage(msgspec.json.encode({"text": event.text}).decode(), event="token")
            elif event.failure is not None:
                failure = event.failure
                yield ServerSentEventMessage(msgspec.json.encode({"rule": failure.rule, "detail": str(failure)}).decode(), event="error")
                return
            else:
                done = ChatAnswer(event.conversation_id, Message("assistant", event.content), event.generation)
                yield ServerSentEventMessage(msgspec.json.encode(done).decode(), event="done")
                return
            event = await anext(events)
    finally:
        # Reached when the client went away too: closing the turn cancels its generation.
        await events.aclose()  # type: ignore[attr-defined]
