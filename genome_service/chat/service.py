"""Persona chat as one operation: check the ask, start the turn, hand back its tokens and reply.

Every refusal (an unknown persona, bad messages, a prompt over budget, a busy engine) is
raised by ``start``, before the first token, so a front door that streams can still answer
with an error status; after that the turn's events end with a ``Reply`` (its ``failure``
set if generation failed midway).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Literal

import msgspec

from genome_service.chat.model_turn import run_model_turn
from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.turn import ChatRefused, Reply, TurnRequest, run_turn
from genome_service.domain.conversation import Generation, Message
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller
from genome_service.services.personas import Personas
from genome_service.settings import Settings
from inference.backends.base import ChatMessage, Token


class AskedMessage(msgspec.Struct, frozen=True):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatAsk(msgspec.Struct, frozen=True, kw_only=True):
    """What a caller asks of a persona; None takes the settings' default."""

    messages: list[AskedMessage] = []
    conversation_id: str | None = None
    max_tokens: int | None = None
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    context_k: int | None = None


class ChatAnswer(msgspec.Struct, frozen=True):
    conversation_id: str
    message: Message
    generation: Generation


class Turn(msgspec.Struct, frozen=True):
    """A started turn: its first event, and the rest (closing them cancels generation)."""

    first: Token | Reply
    rest: AsyncIterator[Token | Reply]


def asked_messages(settings: Settings, messages: Sequence[AskedMessage]) -> tuple[Message, ...]:
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


def turn_request(settings: Settings, persona_id: str, owner: str, ask: ChatAsk) -> TurnRequest:
    max_tokens = settings.chat_default_max_tokens if ask.max_tokens is None else ask.max_tokens
    if not 1 <= max_tokens <= settings.chat_max_tokens_limit:
        raise ChatRefused(422, "max_tokens_out_of_range", f"max_tokens must be within 1..{settings.chat_max_tokens_limit} (got {max_tokens})")
    context_k = settings.chat_context_k if ask.context_k is None else ask.context_k
    if not 0 <= context_k <= settings.search_max_k:
        raise ChatRefused(422, "context_k_out_of_range", f"context_k must be within 0..{settings.search_max_k} (got {context_k})")
    return TurnRequest(
        persona_id=persona_id, owner=owner, messages=asked_messages(settings, ask.messages),
        conversation_id=ask.conversation_id, max_tokens=max_tokens, temperature=ask.temperature,
        top_p=ask.top_p, seed=ask.seed, context_k=context_k,
    )  # fmt: skip


class Chat:
    def __init__(self, services: Services, runtime: ChatRuntime) -> None:
        self.services = services
        self.runtime = runtime

    async def start(self, caller: Caller, persona_id: str, ask: ChatAsk, metadata: EventMetadata) -> Turn:
        """Start a turn with one of the caller's live personas; every refusal is raised here."""
        request = turn_request(self.services.settings, persona_id, caller.owner, ask)
        Personas(self.services).visible(caller, persona_id)
        events = run_turn(self.services, self.runtime, request, metadata)
        return Turn(await anext(events), events)

    async def start_fine_tuned(self, caller: Caller, base_model: str, layer_id: str, ask: ChatAsk) -> Turn:
        """Start a fine-tuned model's turn (`chat/model_turn.py`): the base model plus one layer, the
        caller's messages as they are (their system prompt included), nothing recorded."""
        events = run_model_turn(
            self.services.settings, self.runtime, base_model, layer_id,
            [ChatMessage(m.role, m.content) for m in ask.messages], max_tokens=ask.max_tokens,
            temperature=ask.temperature, top_p=ask.top_p, seed=ask.seed, label=f"{caller.owner}/{layer_id}",
        )
        return Turn(await anext(events), events)

    async def reply(self, turn: Turn) -> Reply:
        """The turn's recorded reply, once generation is done; a failure midway is raised."""
        event = turn.first
        while not isinstance(event, Reply):
            event = await anext(turn.rest)
        if event.failure is not None:
            raise event.failure
        return event

    async def answer(self, turn: Turn) -> ChatAnswer:
        return answer_of(await self.reply(turn))


def answer_of(reply: Reply) -> ChatAnswer:
    return ChatAnswer(reply.conversation_id, Message("assistant", reply.content), reply.generation)
