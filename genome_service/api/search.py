"""Layer discovery and persona knowledge over HTTP: similarity search over the FAISS indexes.

Searches embed text and may load the model on first use, so they run in a thread.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.params import FromPath, FromQuery, JSONBody, MultipartBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from litestar.types import Empty

from genome_service.api.conventions import created, uploaded_files
from genome_service.domain.layer import TraitType
from genome_service.services.context import Caller, Command
from genome_service.services.knowledge import KnowledgeBase, KnowledgeDocument, KnowledgePassage
from genome_service.services.reads import MAX_PAGE, Page
from genome_service.services.search import LayerDiscovery, LayerMatches, LayerQuery


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


class LayerSearch(LayerQuery, frozen=True, forbid_unknown_fields=True):
    """Exactly one of ``text``, ``vector`` or ``like_layer_id``."""


class KnowledgeCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    text: str
    title: str = "note"
    media_type: Literal["text/plain", "text/markdown"] = "text/plain"


def _location(document: KnowledgeDocument) -> str:
    return f"/personas/{document.persona_id}/knowledge"


class LayerSearchController(Controller):
    path = "/layers/search"
    tags = ["search"]
    discovery: LayerDiscovery

    @get("/", operation_id="searchLayersByText", sync_to_thread=True)
    def by_text(
        self, caller: NamedDependency[Caller], q: FromQuery[str], k: FromQuery[int] = 10,
        trait_type: FromQuery[TraitType | None] = None, base_model: FromQuery[str | None] = None,
    ) -> LayerMatches:
        """Layers the caller may see, most similar to the text `q` first (cosine scores)."""
        return self.discovery.find(caller, LayerQuery(text=q, k=k, trait_type=trait_type, base_model=base_model))

    @post("/", operation_id="searchLayers", status_code=200, sync_to_thread=True, request_class=LenientJSONRequest)
    def search(self, caller: NamedDependency[Caller], data: JSONBody[LayerSearch]) -> LayerMatches:
        """Layers most similar to a text, a vector, or another layer (`like_layer_id`, itself left out)."""
        return self.discovery.find(caller, data)


class KnowledgeController(Controller):
    path = "/personas/{persona_id:str}/knowledge"
    tags = ["knowledge"]
    knowledge: KnowledgeBase

    @post("/", operation_id="addKnowledge", status_code=HTTP_201_CREATED, sync_to_thread=True)
    def add(self, command: NamedDependency[Command], persona_id: FromPath[str], data: JSONBody[KnowledgeCreate]) -> Response[KnowledgeDocument]:
        """Add a text to the persona's knowledge: chunked with overlap, searchable at once."""
        document = self.knowledge.add(command, persona_id, data.text, title=data.title, media_type=data.media_type)
        return created(document, _location)

    @post("/documents", operation_id="uploadKnowledge", status_code=HTTP_201_CREATED, sync_to_thread=True)
    def upload(
        self, command: NamedDependency[Command], persona_id: FromPath[str], data: MultipartBody[dict[str, Any]],
    ) -> list[KnowledgeDocument]:
        """Upload text or markdown files (UTF-8), each one document of the persona's knowledge."""
        self.knowledge.writable(command.caller, persona_id)  # an unknown persona is 404 before the parts are read
        return self.knowledge.upload(command, persona_id, uploaded_files(data))

    @get("/", operation_id="listKnowledge", sync_to_thread=False)
    def list(
        self, caller: NamedDependency[Caller], persona_id: FromPath[str],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50, cursor: FromQuery[str | None] = None,
    ) -> Page:
        """The persona's knowledge documents, oldest first, a page at a time."""
        return self.knowledge.list(caller, persona_id, limit=limit, cursor=cursor)

    @delete("/{knowledge_id:str}", operation_id="removeKnowledge", status_code=HTTP_204_NO_CONTENT, sync_to_thread=False)
    def remove(self, command: NamedDependency[Command], persona_id: FromPath[str], knowledge_id: FromPath[str]) -> None:
        """Remove a document: its chunks leave search results at once."""
        self.knowledge.remove(command, persona_id, knowledge_id)

    @get("/search", operation_id="searchKnowledge", sync_to_thread=True)
    def search(
        self, caller: NamedDependency[Caller], persona_id: FromPath[str], q: FromQuery[str], k: FromQuery[int] = 5,
        max_tokens: FromQuery[int | None] = None, mmr: FromQuery[float | None] = None,
    ) -> list[KnowledgePassage]:
        """The persona's chunks most relevant to `q`: top k, within `max_tokens`, diversified by MMR (`mmr` = lambda)."""
        return self.knowledge.search(caller, persona_id, q, k=k, max_tokens=max_tokens, mmr=mmr)
