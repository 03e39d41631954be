"""OpenAI-compatible chat: `POST /v1/chat/completions` and `GET /v1/models`, where a persona is a model.

The official `openai` client works unchanged: `model` is one of the caller's personas,
by id or by name. Each call is one turn of a new conversation (the API is stateless:
the client sends the history), recorded and retrieved like `/personas/{id}/chat`; the
answer adds `conversation_id` and `citations` beside the standard fields.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
import sqlalchemy as sa
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK

from genome_service.api.chat import ChatCreate, ChatMessageIn, finished, start_turn, turn_request
from genome_service.api.errors import NotFound
from genome_service.api.openapi import SSE
from genome_service.api.resources import caller_of
from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.turn import ChatRefused, Reply
from genome_service.domain.conversation import Citation, Generation
from genome_service.projections.tables import PersonaRow
from genome_service.services.bootstrap import Services
from genome_service.services.creation import new_id
from inference.backends.base import Token

PERSONAS = PersonaRow.__table__  # type: ignore[attr-defined]
MAX_MODELS = 1000


class StreamOptions(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    include_usage: bool = False


class CompletionCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    model: str
    messages: list[ChatMessageIn]
    stream: bool = False
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    n: int = 1
    stream_options: StreamOptions | None = None
    user: str | None = None


class CompletionMessage(msgspec.Struct, frozen=True):
    role: Literal["assistant"]
    content: str


class Choice(msgspec.Struct, frozen=True):
    index: int
    message: CompletionMessage
    finish_reason: str


class CompletionUsage(msgspec.Struct, frozen=True):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class Completion(msgspec.Struct, frozen=True):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: CompletionUsage
    conversation_id: str
    citations: list[Citation]


class Model(msgspec.Struct, frozen=True):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    name: str


class ModelList(msgspec.Struct, frozen=True):
    object: Literal["list"]
    data: list[Model]


def _usage(generation: Generation) -> CompletionUsage:
    usage = generation.usage
    return CompletionUsage(usage.prompt_tokens, usage.completion_tokens, usage.prompt_tokens + usage.completion_tokens)


def _finish_reason(generation: Generation) -> str:
    # OpenAI knows stop and length; a repetition stop ends the answer as a stop does.
    return "length" if generation.finish_reason == "length" else "stop"


def resolve_persona(services: Services, owner: str, model: str) -> str:
    """The persona id `model` names among the owner's live personas: its id, else its unique name."""
    columns = (PERSONAS.c.persona_id,)
    live = [PERSONAS.c.owner == owner, PERSONAS.c.archived.is_(False)]
    with services.database.read() as connection:
        by_id = connection.execute(sa.select(*columns).where(PERSONAS.c.persona_id == model, *live)).all()
        by_name = by_id or connection.execute(sa.select(*columns).where(PERSONAS.c.name == model, *live).limit(2)).all()
    if len(by_name) > 1:
        raise ChatRefused(422, "model_ambiguous", f"more than one of your personas is named {model!r}: use its id")
    if not by_name:
        raise NotFound("model", model)
    return str(by_name[0][0])


class OpenAIController(Controller):
    path = "/v1"
    tags = ["openai"]

    # Stream media type on the handler, JSON on the plain answer: see api/chat.py.
    @post("/chat/completions", operation_id="createChatCompletion", status_code=HTTP_200_OK, media_type=SSE)
    async def completions(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], chat: NamedDependency[ChatRuntime],
        data: JSONBody[CompletionCreate],
    ) -> Response[Completion]:
        """A persona's reply in OpenAI's chat completion format; `model` is the persona's id or name."""
        if data.n != 1:
            raise ChatRefused(422, "n_unsupported", f"n must be 1: one answer per request (got {data.n})")
        owner = caller_of(request).owner
        persona_id = resolve_persona(services, owner, data.model)
        create = ChatCreate(
            messages=data.messages, stream=data.stream, max_tokens=data.max_completion_tokens or data.max_tokens,
            temperature=1.0 if data.temperature is None else data.temperature,
            top_p=1.0 if data.top_p is None else data.top_p, seed=data.seed,
        )  # fmt: skip
        turn = turn_request(services.settings, persona_id, owner, create)
        first, events = await start_turn(request, services, chat, persona_id, turn)
        created = int(time.time())
        if data.stream:
            include_usage = data.stream_options is not None and data.stream_options.include_usage
            return ServerSentEvent(_chunks(first, events, data.model, created, include_usage))
        reply = await finished(first, events)
        generation = reply.generation
        completion = Completion(
            f"chatcmpl-{reply.conversation_id}", "chat.completion", created, data.model,
            [Choice(0, CompletionMessage("assistant", reply.content), _finish_reason(generation))],
            _usage(generation), reply.conversation_id, list(generation.citations),
        )
        return Response(completion, media_type=MediaType.JSON)

    @get("/models", operation_id="listModels", sync_to_thread=False)
    def models(self, request: Request[Any, Any, Any], services: NamedDependency[Services]) -> ModelList:
        """The caller's personas, each a model for /v1/chat/completions."""
        owner = caller_of(request).owner
        statement = (sa.select(PERSONAS.c.persona_id, PERSONAS.c.name, PERSONAS.c.created_at)
                     .where(PERSONAS.c.owner == owner, PERSONAS.c.archived.is_(False))
                     .order_by(PERSONAS.c.created_at, PERSONAS.c.persona_id).limit(MAX_MODELS))
        with services.database.read() as connection:
            rows = connection.execute(statement).all()
        return ModelList("list", [Model(pid, "model", int(created.timestamp()), owner, name) for pid, name, created in rows])


async def _chunks(
    first: Token | Reply, events: AsyncIterator[Token | Reply], model: str, created: int, include_usage: bool,
) -> AsyncIterator[ServerSentEventMessage]:
    """OpenAI's stream: `data: {chunk}` per token, a last chunk with the finish reason, then `data: [DONE]`."""
    # Every chunk carries one id; the conversation's is known only once the turn is recorded.
    completion_id = f"chatcmpl-{new_id()}"
    try:
        event = first
        delta: dict[str, str] = {"role": "assistant", "content": ""}
        while isinstance(event, Token):
            delta["content"] = event.text
            yield _chunk(completion_id, created, model, delta, None)
            delta = {"content": ""}
            event = await anext(events)
        if event.failure is not None:
            error = {"error": {"message": str(event.failure), "type": event.failure.rule, "code": event.failure.status}}
            yield ServerSentEventMessage(msgspec.json.encode(error).decode())
            return
        extra = {"conversation_id": event.conversation_id, "citations": msgspec.to_builtins(event.generation.citations)}
        yield _chunk(completion_id, created, model, {}, _finish_reason(event.generation), extra)
        if include_usage:
            yield ServerSentEventMessage(msgspec.json.encode({
                "id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [], "usage": _usage(event.generation),
            }).decode())
        yield ServerSentEventMessage("[DONE]")
    finally:
        await events.aclose()  # type: ignore[attr-defined]


def _chunk(completion_id: str, created: int, model: str, delta: dict[str, str], finish: str | None,
           extra: dict[str, Any] | None = None) -> ServerSentEventMessage:
    chunk = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
             "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **(extra or {})}
    return ServerSentEventMessage(msgspec.json.encode(chunk).decode())
