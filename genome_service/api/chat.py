"""Persona chat over REST: a JSON answer or an SSE stream, and the recorded conversations.

Refusals (unknown persona, bad messages, a prompt over budget, a busy engine) are
found before the first token, so a stream that starts is a 200 whose events end
with ``done`` or, if generation fails midway, ``error``. A client that closes the
stream cancels generation (Litestar cancels the response on ``http.disconnect``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, MediaType, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPI
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK
from prometheus_client.registry import Collector

from genome_service.api.openapi import SSE, document_json_or_sse
from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.service import Chat, ChatAnswer, ChatAsk, Turn, answer_of
from genome_service.chat.turn import Reply
from genome_service.services.context import Caller, Command
from genome_service.services.conversations import ConversationDetail, Conversations
from genome_service.services.reads import MAX_PAGE, Page
from inference.backends.base import Token
from inference.daemon.app import PID_HEADER as WORKER_PID_HEADER


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


def ask_of(data: ChatCreate) -> ChatAsk:
    return msgspec.convert(data, ChatAsk, from_attributes=True)


class ChatController(Controller):
    tags = ["chat"]
    chat: Chat
    conversations: Conversations

    # The handler's media type is the stream's: Litestar lets it override a Stream's own, while a
    # plain Response keeps the JSON type it is given. `document_chat` documents both.
    @post("/personas/{persona_id:str}/chat", operation_id="chat", status_code=HTTP_200_OK, media_type=SSE)
    async def chat_with(self, command: NamedDependency[Command], persona_id: FromPath[str], data: JSONBody[ChatCreate]) -> Response[ChatAnswer]:
        """Ask the persona: a JSON answer, or with `stream` SSE `token` events then `done` (citations, usage, finish)."""
        turn = await self.chat.start(command.caller, persona_id, ask_of(data), command.metadata)
        return ServerSentEvent(sse_events(turn)) if data.stream else await json_answer(self.chat, turn)

    @get("/personas/{persona_id:str}/conversations", operation_id="listConversations", sync_to_thread=False)
    def list(
        self, caller: NamedDependency[Caller], persona_id: FromPath[str],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50, cursor: FromQuery[str | None] = None,
    ) -> Page:
        """The caller's conversations with the persona, oldest first, a page at a time."""
        return self.conversations.list(caller, persona_id, limit=limit, cursor=cursor)

    @get("/conversations/{conversation_id:str}", operation_id="getConversation", sync_to_thread=False)
    def read(self, caller: NamedDependency[Caller], conversation_id: FromPath[str]) -> ConversationDetail:
        """One conversation and every message, with how each reply was generated."""
        return self.conversations.get(caller, conversation_id)


async def json_answer(chat: Chat, turn: Turn) -> Response[ChatAnswer]:
    reply = await chat.reply(turn)
    return Response(answer_of(reply), media_type=MediaType.JSON, headers=worker_header(reply))


def worker_header(reply: Reply) -> dict[str, str]:
    """Names the inference daemon's worker process that generated the reply, when one did."""
    return {WORKER_PID_HEADER: str(reply.worker_pid)} if reply.worker_pid else {}


def document_chat(schema: OpenAPI, path: str = "/personas/{persona_id}/chat") -> None:
    document_json_or_sse(schema, path, "post", "Server-sent events: see the README's chat section")


class EngineCollector(Collector):
    """The chat engine's metrics (queue, tokens, finished requests by reason) on /metrics, once loaded."""

    def __init__(self, runtime: ChatRuntime) -> None:
        self.runtime = runtime

    def collect(self) -> Any:
        engine = self.runtime.engine
        if engine is not None:
            yield from engine.metrics.registry.collect()


async def sse_events(turn: Turn) -> AsyncIterator[ServerSentEventMessage]:
    """`token` events as they come, then `done` with the recorded turn, or `error` if generation failed."""
    try:
        event: Token | Reply = turn.first
        while True:
            if isinstance(event, Token):
                yield ServerSentEventMessage(msgspec.json.encode({"text": event.text}).decode(), event="token")
            elif event.failure is not None:
                failure = event.failure
                yield ServerSentEventMessage(msgspec.json.encode({"rule": failure.rule, "detail": str(failure)}).decode(), event="error")
                return
            else:
                yield ServerSentEventMessage(msgspec.json.encode(answer_of(event)).decode(), event="done")
                return
            event = await anext(turn.rest)
    finally:
        # Reached when the client went away too: closing the turn cancels its generation.
        await turn.rest.aclose()  # type: ignore[attr-defined]
