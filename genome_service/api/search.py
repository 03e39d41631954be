"""Layer discovery and persona knowledge: similarity search over the FAISS indexes.

Every search first brings this process's index up to the log's head (read your
writes, whichever worker wrote), then rechecks each hit against its read-model
row, so a result is never another owner's private layer or a removed chunk.
Searches embed text and may load the model on first use, so they run in a thread.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import PurePath
from typing import Annotated, Any, Literal

import msgspec
import numpy as np
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.params import FromPath, FromQuery, JSONBody, MultipartBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from litestar.types import Empty

from genome_service.api.auth import Caller
from genome_service.api.conventions import Page, command_metadata
from genome_service.api.errors import NotFound
from genome_service.api.layers import Layer, _from_row, _uploaded_files
from genome_service.api.resources import MAX_PAGE, caller_of, page, visible_row, with_etag
from genome_service.domain.knowledge import KNOWLEDGE, RemoveKnowledge
from genome_service.domain.layer import TraitType
from genome_service.projections.queries import get_row
from genome_service.projections.sealed_columns import open_value
from genome_service.projections.tables import KnowledgeRow, LayerRow, PersonaRow
from genome_service.services.bootstrap import Services
from genome_service.services.knowledge import add_knowledge
from genome_service.services.search import SearchRefused
from rag.index import normalise
from rag.retriever import select

LAYERS = LayerRow.__table__  # type: ignore[attr-defined]
PERSONAS = PersonaRow.__table__  # type: ignore[attr-defined]
DOCUMENTS = KnowledgeRow.__table__  # type: ignore[attr-defined]
# MMR and a token budget choose among this many times k of the best chunks.
CANDIDATES_PER_RESULT = 4


class LenientJSONRequest(Request[Any, Any, State]):
    """Reads a JSON body as Python's json module does, which accepts NaN and Infinity: a vector
    holding them then reaches validation and gets a 422 that says so, not a 400 parse error."""

    async def json(self) -> Any:
        if self._json is Empty:
            try:
                self._json = json.loads(await self.body() or b"null")
            except ValueError as error:
                raise ClientException(f"the body is not JSON: {error}") from error
        return self._json


class LayerSearch(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Exactly one of ``text``, ``vector`` or ``like_layer_id``."""

    text: str | None = None
    vector: list[float] | None = None
    like_layer_id: str | None = None
    k: int = 10
    trait_type: TraitType | None = None
    base_model: str | None = None
    tags: list[str] = []


class LayerMatch(msgspec.Struct, frozen=True):
    score: float  # cosine similarity, -1..1
    layer: Layer


class LayerMatches(msgspec.Struct, frozen=True):
    items: list[LayerMatch]


class KnowledgeCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str
    title: str = "note"
    media_type: Literal["text/plain", "text/markdown"] = "text/plain"


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


def _layer_matches(services: Services, caller: Caller, query: np.ndarray, k: int, filters: LayerSearch, exclude: str | None = None) -> LayerMatches:
    hits = services.search.search_layers(
        query, k + (exclude is not None), owner=caller.owner, trait_type=filters.trait_type and filters.trait_type.value,
        base_model=filters.base_model, tags=filters.tags,
    )
    items = []
    with services.database.read() as connection:
        for hit in hits:
            row = get_row(connection, LAYERS, "layer_id", hit.key)
            visible = row is not None and (row["owner"] == caller.owner or row["public"]) and not row["deprecated"]
            if visible and hit.key != exclude:
                items.append(LayerMatch(hit.score, _from_row(row)))  # type: ignore[arg-type]
    return LayerMatches(items[:k])


class LayerSearchController(Controller):
    path = "/layers/search"
    tags = ["search"]

    @get("/", operation_id="searchLayersByText", sync_to_thread=True)
    def by_text(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], q: FromQuery[str], k: FromQuery[int] = 10,
        trait_type: FromQuery[TraitType | None] = None, base_model: FromQuery[str | None] = None,
    ) -> LayerMatches:
        """Layers the caller may see, most similar to the text `q` first (cosine scores)."""
        services.search.check_k(k, services.settings.search_max_k)
        query = services.search.query_vector(q)
        services.search.current()
        filters = LayerSearch(trait_type=trait_type, base_model=base_model)
        return _layer_matches(services, caller_of(request), query, k, filters)

    @post("/", operation_id="searchLayers", status_code=200, sync_to_thread=True, request_class=LenientJSONRequest)
    def search(self, request: Request[Any, Any, Any], services: NamedDependency[Services], data: JSONBody[LayerSearch]) -> LayerMatches:
        """Layers most similar to a text, a vector, or another layer (`like_layer_id`, itself left out)."""
        search, caller = services.search, caller_of(request)
        given = [name for name in ("text", "vector", "like_layer_id") if getattr(data, name) is not None]
        if len(given) != 1:
            raise SearchRefused("one_query_required", f"give exactly one of text, vector or like_layer_id (got {len(given)})")
        search.check_k(data.k, services.settings.search_max_k)
        if data.vector is not None:
            query = normalise(data.vector, search.embedder.dimension)
        elif data.text is not None:
            query = search.query_vector(data.text)
        search.current()
        if data.like_layer_id is not None:
            row = visible_row(services, LAYERS, "layer_id", data.like_layer_id, caller, "layer",
                              archived_column="deprecated", public_column="public")
            vector = search.layer_vector(row["layer_id"])
            assert vector is not None, "a visible, live layer is always in the caught-up index"
            query = vector
        return _layer_matches(services, caller, query, data.k, data, exclude=data.like_layer_id)


def _documents(services: Services, persona_id: str, rows: list[dict[str, Any]]) -> list[KnowledgeDocument]:
    """The documents of one persona's rows, their sealed titles opened."""
    with services.database.read() as connection:
        key = services.data_keys.for_reading(connection, [persona_id])[persona_id]
    return [
        KnowledgeDocument(row["knowledge_id"], row["persona_id"], open_value(key, DOCUMENTS, row, "title") or "",
                          row["media_type"], row["chunk_count"], row["version"], row["created_at"], row["updated_at"])
        for row in rows
    ]


def _persona(services: Services, request: Request[Any, Any, Any], persona_id: str) -> dict[str, Any]:
    return visible_row(services, PERSONAS, "persona_id", persona_id, caller_of(request), "persona")


def _media_type(filename: str) -> str:
    return "text/markdown" if PurePath(filename).suffix.lower() in (".md", ".markdown") else "text/plain"


class KnowledgeController(Controller):
    path = "/personas/{persona_id:str}/knowledge"
    tags = ["knowledge"]

    @post("/", operation_id="addKnowledge", status_code=HTTP_201_CREATED, sync_to_thread=True)
    def add(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        data: JSONBody[KnowledgeCreate],
    ) -> Response[KnowledgeDocument]:
        """Add a text to the persona's knowledge: chunked with overlap, searchable at once."""
        _persona(services, request, persona_id)
        owner = caller_of(request).owner
        outcome = add_knowledge(services, owner, persona_id, data.title, data.media_type, data.text, command_metadata(request, owner, services.data_keys))
        return self._created(services, outcome.aggregate.stream_id)

    @post("/documents", operation_id="uploadKnowledge", status_code=HTTP_201_CREATED, sync_to_thread=True)
    def upload(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        data: MultipartBody[dict[str, Any]],
    ) -> list[KnowledgeDocument]:
        """Upload text or markdown files (UTF-8), each one document of the persona's knowledge."""
        _persona(services, request, persona_id)
        owner = caller_of(request).owner
        files = _uploaded_files(data)
        try:
            texts = {name: content.decode("utf-8") for name, content in files.items()}
        except UnicodeDecodeError as error:
            raise SearchRefused("text_not_utf8", "knowledge files must be UTF-8 text or markdown") from error
        created = []
        for name, text in texts.items():
            outcome = add_knowledge(services, owner, persona_id, name[:200], _media_type(name), text, command_metadata(request, owner, services.data_keys))
            created.append(outcome.aggregate.stream_id)
        return [self._created(services, knowledge_id).content for knowledge_id in created]

    @get("/", operation_id="listKnowledge", sync_to_thread=False)
    def list(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50, cursor: FromQuery[str | None] = None,
    ) -> Page:
        """The persona's knowledge documents, oldest first, a page at a time."""
        _persona(services, request, persona_id)
        where = [DOCUMENTS.c.persona_id == persona_id, DOCUMENTS.c.removed.is_(False)]
        rows, next_cursor = page(services, DOCUMENTS, "knowledge_id", where, cursor, limit)
        return Page(_documents(services, persona_id, rows), next_cursor)

    @delete("/{knowledge_id:str}", operation_id="removeKnowledge", status_code=HTTP_204_NO_CONTENT, sync_to_thread=False)
    def remove(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        knowledge_id: FromPath[str],
    ) -> None:
        """Remove a document: its chunks leave search results at once."""
        _persona(services, request, persona_id)
        with services.database.read() as connection:
            row = get_row(connection, DOCUMENTS, "knowledge_id", knowledge_id)
        if row is None or row["persona_id"] != persona_id or row["removed"]:
            raise NotFound("knowledge", knowledge_id)
        owner = caller_of(request).owner
        services.commands.execute(KNOWLEDGE, knowledge_id, RemoveKnowledge(), metadata=command_metadata(request, owner, services.data_keys))

    @get("/search", operation_id="searchKnowledge", sync_to_thread=True)
    def search(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        q: FromQuery[str], k: FromQuery[int] = 5,
        max_tokens: FromQuery[int | None] = None, mmr: FromQuery[float | None] = None,
    ) -> list[KnowledgePassage]:
        """The persona's chunks most relevant to `q`: top k, within `max_tokens`, diversified by MMR (`mmr` = lambda)."""
        _persona(services, request, persona_id)
        search = services.search
        search.check_k(k, services.settings.search_max_k)
        if max_tokens is not None and max_tokens < 1:
            raise SearchRefused("max_tokens_out_of_range", f"max_tokens must be >= 1 (got {max_tokens})")
        if mmr is not None and not 0.0 <= mmr <= 1.0:
            raise SearchRefused("mmr_out_of_range", f"mmr (lambda) must be within [0, 1] (got {mmr})")
        query = search.query_vector(q)
        wanted = k if max_tokens is None and mmr is None else k * CANDIDATES_PER_RESULT
        candidates = search.knowledge_candidates(query, wanted, persona_id)
        passages = select(candidates, k=k, token_budget=max_tokens, count_tokens=search.embedder.count_tokens, mmr_lambda=mmr)
        return [KnowledgePassage(p.id, p.source_id, p.text, p.score, p.tokens) for p in passages]

    def _created(self, services: Services, knowledge_id: str) -> Response[KnowledgeDocument]:
        with services.database.read() as connection:
            row = get_row(connection, DOCUMENTS, "knowledge_id", knowledge_id)
        assert row is not None, "the read model is projected in the appending transaction"
        document = _documents(services, row["persona_id"], [row])[0]
        return with_etag(document, document.version, HTTP_201_CREATED, {"Location": f"/personas/{document.persona_id}/knowledge"})

