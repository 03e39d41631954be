"""Conversation: a persona's chat with one owner, recorded turn by turn so every reply can be audited.

A turn (the caller's new messages and the persona's reply) is one decision and so
one atomic append: a conversation never holds a question without its answer. The
reply records what produced it: the knowledge chunks retrieved (ids and scores),
the model, the LoRA stack's hash, the sampling parameters and the token usage.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from genome_service.domain.common import Decider, DomainError, require, require_text

STREAM_TYPE = "conversation"
MAX_MESSAGE_LENGTH = 100_000

Role = Literal["user", "assistant"]


class Citation(msgspec.Struct, frozen=True, gc=False):
    """A retrieved knowledge chunk (``knowledge_id:ordinal``) and its cosine score to the question."""

    chunk_id: str
    score: float


class SamplingUsed(msgspec.Struct, frozen=True, gc=False):
    temperature: float
    top_p: float
    max_tokens: int
    seed: int | None = None


class Usage(msgspec.Struct, frozen=True, gc=False):
    prompt_tokens: int
    completion_tokens: int


class Generation(msgspec.Struct, frozen=True, gc=False):
    """How a reply was produced."""

    model: str
    stack_hash: str | None  # None: the plain base model
    sampling: SamplingUsed
    usage: Usage
    finish_reason: str
    citations: tuple[Citation, ...] = ()


# Events
class ConversationStarted(msgspec.Struct, frozen=True, gc=False, tag=True):
    conversation_id: str
    persona_id: str
    owner: str


class MessageAdded(msgspec.Struct, frozen=True, gc=False, tag=True, omit_defaults=True):
    role: Role
    content: str
    generation: Generation | None = None  # set on the persona's replies
    # Set only on read, when the persona's key was shredded: the content is then empty.
    erased: bool = False


ConversationEvent = ConversationStarted | MessageAdded


# State
class Message(msgspec.Struct, frozen=True, gc=False):
    role: Role
    content: str
    generation: Generation | None = None


class Conversation(msgspec.Struct, frozen=True, gc=False):
    conversation_id: str
    persona_id: str
    owner: str
    messages: tuple[Message, ...] = ()
    erased: bool = False  # the persona's key was shredded: the messages' contents are gone


# Commands
class RecordTurn(msgspec.Struct, frozen=True, gc=False):
    """The caller's new messages and the reply; starts the conversation when it does not exist."""

    conversation_id: str
    persona_id: str
    owner: str
    asked: tuple[Message, ...]
    reply: Message


def validate_asked(asked: tuple[Message, ...]) -> None:
    """What a caller may ask in one turn: at least one message, the last from the user, none empty."""
    require(len(asked) > 0 and asked[-1].role == "user", "messages_required",
            "a turn needs at least one message, the last from the user")
    for message in asked:
        require_text(message.content, "message", max_length=MAX_MESSAGE_LENGTH)


def decide(command: RecordTurn, state: Conversation | None) -> list[ConversationEvent]:
    if not isinstance(command, RecordTurn):
        raise DomainError("unknown_command", f"conversation cannot handle {type(command).__name__}")
    if state is not None:
        # Someone else's conversation is not found, not forbidden: its existence is not told.
        require(state.owner == command.owner and state.persona_id == command.persona_id, "conversation_not_found",
                f"conversation {command.conversation_id} does not exist")
    validate_asked(command.asked)
    require(command.reply.role == "assistant" and command.reply.generation is not None, "reply_required",
            "a turn ends with the persona's reply and how it was generated")
    started = [] if state is not None else [ConversationStarted(command.conversation_id, command.persona_id, command.owner)]
    added = [MessageAdded(m.role, m.content, m.generation) for m in (*command.asked, command.reply)]
    return [*started, *added]


def evolve(state: Conversation | None, event: ConversationEvent) -> Conversation:
    match event:
        case ConversationStarted():
            return Conversation(event.conversation_id, event.persona_id, event.owner)
    assert state is not None, f"{type(event).__name__} before ConversationStarted"
    match event:
        case MessageAdded(role=role, content=content, generation=generation, erased=erased):
            return msgspec.structs.replace(state, messages=(*state.messages, Message(role, content, generation)),
                                           erased=state.erased or erased)
    raise TypeError(f"unknown conversation event {type(event).__name__}")


CONVERSATION = Decider(
    stream_type=STREAM_TYPE,
    event_type=ConversationEvent,
    state_type=Conversation,
    decide=decide,
    evolve=evolve,
)
