"""OpenAI-compatible chat: `POST /v1/chat/completions` and `GET /v1/models`, where a persona is a model.

The official `openai` client works unchanged: `model` is one of the caller's personas,
by id or by name, or a fine-tuned model (`ft:<base>:<suffix>:<layer id>`, from a
fine-tuning job: the base model plus that layer, nothing recorded). Each call is one turn of a new conversation (the API is stateless:
the client sends the history), recorded and retrieved like `/personas/{id}/chat`; the
answer adds `conversation_id` and `citations` beside the standard fields.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import msgspec
from litestar import Controller, MediaType, Response, get, post
from litestar.di import NamedDependency
from litestar.params import JSONBody
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_200_OK

from genome_service.api.chat import ChatMessageIn, worker_header
from genome_service.api.openapi import SSE
from genome_service.chat.service import AskedMessage, Chat, ChatAsk, Turn
from genome_service.chat.turn import ChatRefused, Reply
from genome_service.domain.conversation import Citation, Generation
from genome_service.services.context import Caller, Command
from genome_service.services.creation import new_id
from genome_service.services.fine_tuning import FineTuning
from genome_service.services.personas import Personas
from inference.backends.base import Token


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


def _ask(data: CompletionCreate) -> ChatAsk:
    """The chat ask an OpenAI request makes (OpenAI's sampling defaults, not the persona chat's)."""
    if data.n != 1:
        raise ChatRefused(422, "n_unsupported", f"n must be 1: one answer per request (got {data.n})")
    return ChatAsk(
        messages=[AskedMessage(m.role, m.content) for m in data.messages], max_tokens=data.max_completion_tokens or data.max_tokens,
        temperature=1.0 if data.temperature is None else data.temperature,
        top_p=1.0 if data.top_p is None else data.top_p, seed=data.seed,
    )  # fmt: skip


def _streamed(turn: Turn, data: CompletionCreate) -> Response[Any]:
    include_usage = data.stream_options is not None and data.stream_options.include_usage
    return ServerSentEvent(_chunks(turn, data.model, int(time.time()), include_usage))


def _completion(reply: Reply, model: str) -> Response[Completion]:
    generation = reply.generation
    completion = Completion(
        id=f"chatcmpl-{reply.conversation_id}", object="chat.completion", created=int(time.time()), model=model,
        choices=[Choice(0, CompletionMessage("assistant", reply.content), _finish_reason(generation))],
        usage=_usage(generation), conversation_id=reply.conversation_id, citations=list(generation.citations),
    )
    return Response(completion, media_type=MediaType.JSON, headers=worker_header(reply))


class OpenAIController(Controller):
    path = "/v1"
    tags = ["openai"]
    chat: Chat
    personas: Personas
    jobs: FineTuning

    # Stream media type on the handler, JSON on the plain answer: see api/chat.py.
    @post("/chat/completions", operation_id="createChatCompletion", status_code=HTTP_200_OK, media_type=SSE)
    async def completions(self, command: NamedDependency[Command], data: JSONBody[CompletionCreate]) -> Response[Completion]:
        """A reply in OpenAI's chat completion format; `model` is a persona's id or name, or a fine-tuned model."""
        turn = await self._start(command, data)
        return _streamed(turn, data) if data.stream else _completion(await self.chat.reply(turn), data.model)

    async def _start(self, command: Command, data: CompletionCreate) -> Turn:
        """A fine-tuned model's turn (`ft:<base>:<suffix>:<layer id>`), else a persona's."""
        ask = _ask(data)
        fine_tuned = self.jobs.layer_for_model(command.caller, data.model)
        if fine_tuned is not None:
            return await self.chat.start_fine_tuned(command.caller, *fine_tuned, ask)
        persona_id = self.personas.resolve_model(command.caller, data.model)
        return await self.chat.start(command.caller, persona_id, ask, command.metadata)

    @get("/models", operation_id="listModels", sync_to_thread=False)
    def models(self, caller: NamedDependency[Caller]) -> ModelList:
        """The caller's personas and fine-tuned models, each a model for /v1/chat/completions."""
        personas = [Model(id=p.id, object="model", created=int(p.created_at.timestamp()), owned_by=caller.owner, name=p.name)
                    for p in self.personas.as_models(caller)]
        tuned = [Model(id=name, object="model", created=created, owned_by=caller.owner, name=name)
                 for name, created in self.jobs.models(caller)]
        return ModelList(object="list", data=personas + tuned)


async def _chunks(turn: Turn, model: str, created: int, include_usage: bool) -> AsyncIterator[ServerSentEventMessage]:
    """OpenAI's stream: `data: {chunk}` per token, a last chunk with the finish reason, then `data: [DONE]`."""
    # Every chunk carries one id; the conversation's is known only once the turn is recorded.
    completion_id = f"chatcmpl-{new_id()}"
    events = turn.rest
    try:
        event = turn.first
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
