"""Layer discovery: the layers most similar to a text, a vector or another layer (cosine scores).

The search runs on this process's index, brought up to the log's head first; every hit is
then rechecked against its read-model row, so a result is never another owner's private
layer nor a deprecated one, whatever the index still holds.
"""

from __future__ import annotations

import msgspec
import numpy as np

from genome_service.domain.layer import TraitType
from genome_service.projections.queries import get_row
from genome_service.projections.tables import LAYERS
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller
from genome_service.services.indexes import SearchRefused
from genome_service.services.layers import LIVE, Layer, layer_from_row
from genome_service.services.reads import visible_row
from rag.index import normalise


class LayerMatch(msgspec.Struct, frozen=True):
    score: float  # cosine similarity, -1..1
    layer: Layer


class LayerMatches(msgspec.Struct, frozen=True):
    items: list[LayerMatch]


class LayerQuery(msgspec.Struct, frozen=True, kw_only=True):
    """Exactly one of ``text``, ``vector`` or ``like_layer_id``, with filters."""

    text: str | None = None
    vector: list[float] | None = None
    like_layer_id: str | None = None
    k: int = 10
    trait_type: TraitType | None = None
    base_model: str | None = None
    tags: list[str] = []


class LayerDiscovery:
    def __init__(self, services: Services) -> None:
        self.services = services

    def find(self, caller: Caller, query: LayerQuery) -> LayerMatches:
        """Layers the caller may see, most similar to the query first; a layer asked about is left out."""
        given = [name for name in ("text", "vector", "like_layer_id") if getattr(query, name) is not None]
        if len(given) != 1:
            raise SearchRefused("one_query_required", f"give exactly one of text, vector or like_layer_id (got {len(given)})")
        indexes = self.services.search
        indexes.check_k(query.k, self.services.settings.search_max_k)
        if query.vector is not None:
            vector = normalise(query.vector, indexes.embedder.dimension)
        elif query.text is not None:
            vector = indexes.query_vector(query.text)
        indexes.current()
        if query.like_layer_id is not None:
            row = visible_row(self.services, LIVE, query.like_layer_id, caller)
            found = indexes.layer_vector(row["layer_id"])
            assert found is not None, "a visible, live layer is always in the caught-up index"
            vector = found
        return self._matches(caller, vector, query)

    def _matches(self, caller: Caller, vector: np.ndarray, query: LayerQuery) -> LayerMatches:
        exclude = query.like_layer_id
        hits = self.services.search.search_layers(
            vector, query.k + (exclude is not None), owner=caller.owner, trait_type=query.trait_type and query.trait_type.value,
            base_model=query.base_model, tags=query.tags,
        )
        items = []
        with self.services.database.read() as connection:
            for hit in hits:
                row = get_row(connection, LAYERS, "layer_id", hit.key)
                seen = row is not None and (row["owner"] == caller.owner or row["public"]) and not row["deprecated"]
                if seen and hit.key != exclude:
                    items.append(LayerMatch(hit.score, layer_from_row(row)))  # type: ignore[arg-type]
        return LayerMatches(items[:query.k])
