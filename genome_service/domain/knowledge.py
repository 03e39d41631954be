"""Knowledge: a document a persona draws on in chat, kept as the chunks it is searched by.

Each document is its own stream. Its title and chunk texts are stored sealed
with the persona's data key (``genome_service/services/personal_data.py``); once
that key is shredded they read back empty, with ``erased`` set. No event carries
an embedding: vectors are derived.
"""

from __future__ import annotations

import msgspec

from genome_service.domain.common import (
    Decider,
    DomainError,
    require,
    require_exists,
    require_new,
    require_text,
)

STREAM_TYPE = "knowledge"
MAX_CHUNKS = 2_000
MAX_CHUNK_LENGTH = 20_000
MEDIA_TYPES = ("text/plain", "text/markdown")


# Events
class KnowledgeAdded(msgspec.Struct, frozen=True, gc=False, tag=True, omit_defaults=True):
    knowledge_id: str
    persona_id: str
    owner: str
    title: str
    media_type: str
    chunks: tuple[str, ...]
    # Set only on read, when the persona's key was shredded: title and chunks are then empty.
    erased: bool = False


class KnowledgeRemoved(msgspec.Struct, frozen=True, gc=False, tag=True):
    pass


KnowledgeEvent = KnowledgeAdded | KnowledgeRemoved


# State
class Knowledge(msgspec.Struct, frozen=True, gc=False):
    knowledge_id: str
    persona_id: str
    owner: str
    title: str
    media_type: str
    chunks: tuple[str, ...]
    removed: bool = False
    erased: bool = False


# Commands
class PersonaFacts(msgspec.Struct, frozen=True, gc=False):
    """What a document needs to know of the persona it is added to."""

    persona_id: str
    owner: str
    archived: bool


class AddKnowledge(msgspec.Struct, frozen=True, gc=False):
    knowledge_id: str
    persona: PersonaFacts
    owner: str
    title: str
    media_type: str
    chunks: tuple[str, ...]


class RemoveKnowledge(msgspec.Struct, frozen=True, gc=False):
    pass


KnowledgeCommand = AddKnowledge | RemoveKnowledge


def decide(command: KnowledgeCommand, state: Knowledge | None) -> list[KnowledgeEvent]:
    if isinstance(command, AddKnowledge):
        require_new(state, "knowledge")
        persona = command.persona
        require(persona.owner == command.owner, "persona_not_found", f"persona {persona.persona_id} does not exist")
        require(not persona.archived, "persona_archived", f"persona {persona.persona_id} is archived")
        require_text(command.title, "title", max_length=200)
        require(command.media_type in MEDIA_TYPES, "media_type_unsupported",
                f"knowledge must be one of {', '.join(MEDIA_TYPES)} (got {command.media_type!r})")
        require(len(command.chunks) > 0, "text_required", "the text must hold at least one word")
        require(len(command.chunks) <= MAX_CHUNKS, "text_too_long", f"at most {MAX_CHUNKS} chunks (got {len(command.chunks)})")
        for chunk in command.chunks:
            require_text(chunk, "chunk", max_length=MAX_CHUNK_LENGTH)
        return [KnowledgeAdded(command.knowledge_id, persona.persona_id, command.owner, command.title,
                               command.media_type, command.chunks)]
    require_exists(state, "knowledge")
    assert state is not None
    if isinstance(command, RemoveKnowledge):
        return [] if state.removed else [KnowledgeRemoved()]
    raise DomainError("unknown_command", f"knowledge cannot handle {type(command).__name__}")


def evolve(state: Knowledge | None, event: KnowledgeEvent) -> Knowledge:
    match event:
        case KnowledgeAdded():
            return Knowledge(**msgspec.structs.asdict(event))
    assert state is not None, f"{type(event).__name__} before KnowledgeAdded"
    match event:
        case KnowledgeRemoved():
            return msgspec.structs.replace(state, removed=True)
    raise TypeError(f"unknown knowledge event {type(event).__name__}")


KNOWLEDGE = Decider(
    stream_type=STREAM_TYPE,
    event_type=KnowledgeEvent,
    state_type=Knowledge,
    decide=decide,
    evolve=evolve,
)
