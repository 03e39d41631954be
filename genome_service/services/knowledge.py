"""A persona's knowledge: documents chunked with overlap, sealed with its data key, searchable at once.

Adding embeds the chunks before the append, so the index's catch-up on the next search
finds their vectors in the embedder's cache. Searches bring the index up to the log's head
first (read your writes, whichever process wrote) and recheck every hit against the read
model, so a removed chunk is never returned.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from pathlib import PurePath

import msgspec
import sqlalchemy as sa

from genome_service.domain.knowledge import KNOWLEDGE, AddKnowledge, Knowledge, PersonaFacts, RemoveKnowledge
from genome_service.domain.persona import PERSONA
from genome_service.eventstore.records import EventMetadata
from genome_service.projections.queries import Row, get_row
from genome_service.projections.sealed_columns import open_value
from genome_service.projections.tables import KNOWLEDGE_DOCUMENTS
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.errors import NotFound
from genome_service.services.handler import Outcome
from genome_service.services.personas import Personas
from genome_service.services.reads import Page, page
from genome_service.services.indexes import SearchRefused
from rag.chunker import chunk
from rag.retriever import select

# MMR and a token budget choose among this many times k of the best chunks.
CANDIDATES_PER_RESULT = 4
MAX_TITLE = 200


class KnowledgeDocument(msgspec.Struct, frozen=True):
    id: str
    persona_id: str
    title: str
    media_type: str
    chunk_count: int
    version: int
    created_at: datetime
    updated_at: datetime


class KnowledgePassage(msgspec.Struct, frozen=True):
    id: str
    knowledge_id: str
    text: str
    score: float  # cosine similarity, -1..1
    tokens: int


def add_knowledge(
    services: Services, owner: str, persona_id: str, title: str, media_type: str, text: str, metadata: EventMetadata,
) -> Outcome[Knowledge]:
    """Refused input appends nothing: the command is decided once before anything is embedded."""
    persona = services.repository.load(PERSONA, persona_id).state
    facts = PersonaFacts(persona_id, persona.owner if persona else "", persona.archived if persona else False)
    settings = services.settings
    chunks = tuple(c.text for c in chunk(text, size=settings.chunk_words, overlap=settings.chunk_overlap_words))

    def command(knowledge_id: str) -> AddKnowledge:
        return AddKnowledge(knowledge_id, facts, owner, title, media_type, chunks)

    KNOWLEDGE.decide(command("validation"), None)
    services.search.embedder.embed(chunks)
    return create_stream(services, KNOWLEDGE, metadata, command)


def media_type_of(filename: str) -> str:
    return "text/markdown" if PurePath(filename).suffix.lower() in (".md", ".markdown") else "text/plain"


class KnowledgeBase:
    """The knowledge of the caller's personas: documents and search."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self.personas = Personas(services)

    def writable(self, caller: Caller, persona_id: str) -> None:
        """Refuses unless the persona is the caller's and live: whose knowledge the caller may change."""
        self.personas.visible(caller, persona_id)

    # Commands
    def add(self, command: Command, persona_id: str, text: str, *, title: str = "note", media_type: str = "text/plain") -> KnowledgeDocument:
        """Add a text to a live persona's knowledge."""
        self.personas.visible(command.caller, persona_id)
        outcome = add_knowledge(self.services, command.owner, persona_id, title, media_type, text, command.metadata)
        return self._document(outcome.aggregate.stream_id)

    def upload(self, command: Command, persona_id: str, files: Mapping[str, bytes]) -> list[KnowledgeDocument]:
        """Text or markdown files (UTF-8), each one document, titled by its file name."""
        self.personas.visible(command.caller, persona_id)
        try:
            texts = {name: content.decode("utf-8") for name, content in files.items()}
        except UnicodeDecodeError as error:
            raise SearchRefused("text_not_utf8", "knowledge files must be UTF-8 text or markdown") from error
        # One document per file, each under its own idempotency key: a retry replays every one.
        return [
            self.add(command.derived(f"file:{name}"), persona_id, text, title=name[:MAX_TITLE], media_type=media_type_of(name))
            for name, text in texts.items()
        ]

    def remove(self, command: Command, persona_id: str, knowledge_id: str) -> None:
        """Remove a document: its chunks leave search results at once."""
        self.personas.visible(command.caller, persona_id)
        with self.services.database.read() as connection:
            row = get_row(connection, KNOWLEDGE_DOCUMENTS, "knowledge_id", knowledge_id)
        if row is None or row["persona_id"] != persona_id or row["removed"]:
            raise NotFound("knowledge", knowledge_id)
        self.services.commands.execute(KNOWLEDGE, knowledge_id, RemoveKnowledge(), metadata=command.metadata)

    # Reads
    def list(self, caller: Caller, persona_id: str, *, limit: int = 50, cursor: str | None = None) -> Page:
        """A live persona's documents, oldest first, a page at a time."""
        self.personas.visible(caller, persona_id)
        where = [KNOWLEDGE_DOCUMENTS.c.persona_id == persona_id, KNOWLEDGE_DOCUMENTS.c.removed.is_(False)]
        rows, next_cursor = page(self.services, KNOWLEDGE_DOCUMENTS, "knowledge_id", where, cursor, limit)
        return Page(self._documents(persona_id, rows), next_cursor)

    def search(
        self, caller: Caller, persona_id: str, text: str, *, k: int = 5, max_tokens: int | None = None, mmr: float | None = None,
    ) -> list[KnowledgePassage]:
        """The persona's chunks most relevant to ``text``: top k, within ``max_tokens``, diversified by MMR (lambda)."""
        self.personas.visible(caller, persona_id)
        search = self.services.search
        search.check_k(k, self.services.settings.search_max_k)
        if max_tokens is not None and max_tokens < 1:
            raise SearchRefused("max_tokens_out_of_range", f"max_tokens must be >= 1 (got {max_tokens})")
        if mmr is not None and not 0.0 <= mmr <= 1.0:
            raise SearchRefused("mmr_out_of_range", f"mmr (lambda) must be within [0, 1] (got {mmr})")
        query = search.query_vector(text)
        wanted = k if max_tokens is None and mmr is None else k * CANDIDATES_PER_RESULT
        candidates = search.knowledge_candidates(query, wanted, persona_id)
        passages = select(candidates, k=k, token_budget=max_tokens, count_tokens=search.embedder.count_tokens, mmr_lambda=mmr)
        return [KnowledgePassage(id=p.id, knowledge_id=p.source_id, text=p.text, score=p.score, tokens=p.tokens) for p in passages]

    def _document(self, knowledge_id: str) -> KnowledgeDocument:
        with self.services.database.read() as connection:
            row = get_row(connection, KNOWLEDGE_DOCUMENTS, "knowledge_id", knowledge_id)
        assert row is not None, "the read model is projected in the appending transaction"
        return self._documents(row["persona_id"], [row])[0]

    def _documents(self, persona_id: str, rows: list[Row]) -> list[KnowledgeDocument]:
        """The documents of one persona's rows, their sealed titles opened."""
        with self.services.database.read() as connection:
            key = self.services.data_keys.for_reading(connection, [persona_id])[persona_id]
        return [
            KnowledgeDocument(
                id=row["knowledge_id"], persona_id=row["persona_id"],
                title=open_value(key, KNOWLEDGE_DOCUMENTS, row, "title") or "", media_type=row["media_type"],
                chunk_count=row["chunk_count"], version=row["version"], created_at=row["created_at"],
                updated_at=row["updated_at"],
            )
            for row in rows
        ]


def persona_texts(services: Services, persona_id: str) -> list[str]:
    """The persona's knowledge as its chunks' text, oldest document first (for distilling it into a layer)."""
    query = (sa.select(KNOWLEDGE_DOCUMENTS.c.knowledge_id)
             .where(KNOWLEDGE_DOCUMENTS.c.persona_id == persona_id, KNOWLEDGE_DOCUMENTS.c.removed.is_(False))
             .order_by(KNOWLEDGE_DOCUMENTS.c.created_at, KNOWLEDGE_DOCUMENTS.c.knowledge_id))
    with services.database.read() as connection:
        ids = list(connection.execute(query).scalars())
    texts: list[str] = []
    for knowledge_id in ids:
        state = services.repository.load(KNOWLEDGE, knowledge_id).state
        if state is not None and not state.removed and not state.erased:
            texts.extend(state.chunks)
    return texts
