"""Adding knowledge to a persona: chunk the text, embed the chunks ahead, append the event."""

from __future__ import annotations

from genome_service.domain.knowledge import KNOWLEDGE, AddKnowledge, Knowledge, PersonaFacts
from genome_service.domain.persona import PERSONA
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services
from genome_service.services.creation import create_stream
from genome_service.services.handler import Outcome
from rag.chunker import chunk


def add_knowledge(
    services: Services, owner: str, persona_id: str, title: str, media_type: str, text: str, metadata: EventMetadata,
) -> Outcome[Knowledge]:
    """Refused input appends nothing. The chunks are embedded before the append, so the
    index's catch-up on the next search finds their vectors in the embedder's cache."""
    persona = services.repository.load(PERSONA, persona_id).state
    facts = PersonaFacts(persona_id, persona.owner if persona else "", persona.archived if persona else False)
    settings = services.settings
    chunks = tuple(c.text for c in chunk(text, size=settings.chunk_words, overlap=settings.chunk_overlap_words))

    def command(knowledge_id: str) -> AddKnowledge:
        return AddKnowledge(knowledge_id, facts, owner, title, media_type, chunks)

    KNOWLEDGE.decide(command("validation"), None)
    services.search.embedder.embed(chunks)
    return create_stream(services, KNOWLEDGE, metadata, command)
