"""Layer search and persona knowledge: the FAISS indexes kept as projections of the log.

Each process holds its own indexes in memory. Before a search they catch up from
the log (one ``max(position)`` query when nothing is new), so a search sees every
write committed before it, whichever process wrote it. Every ``index_save_every``
events they are saved with the position they reflect; a process that starts loads
them and replays only the rest. Both indexes are a pure function of the log: the
operations they receive depend only on the events, in log order (see
``rag.index`` and ``rag.embedder`` for why the results are bit-identical).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import sqlalchemy as sa

from genome_service.domain.common import Decider
from genome_service.domain.knowledge import KNOWLEDGE, Knowledge
from genome_service.domain.layer import LAYER, Layer
from genome_service.domain.persona import PersonaErased
from genome_service.eventstore.records import RecordedEvent
from genome_service.eventstore.repository import Repository
from genome_service.projections.sealed_columns import open_value
from genome_service.projections.tables import KNOWLEDGE_CHUNKS as CHUNKS
from genome_service.settings import Settings
from rag.embedder import Embedder
from rag.index import Filter, Hit, IndexConfig, VectorIndex
from rag.retriever import Candidate

Progress = Callable[[int, int], None]
PUBLIC = "*"  # the audience of a public layer; a private one's is its owner
LAYER_ATTRIBUTES = ("audience", "trait_type", "base_model")
KNOWLEDGE_ATTRIBUTES = ("persona_id",)


class SearchRefused(ValueError):
    """A search request the service cannot answer as asked; ``rule`` names why (HTTP 422)."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule


def layer_text(layer: Layer) -> str:
    """What a layer is found by: its name, description, trait type and tags."""
    return "\n".join((layer.name, layer.description, f"trait: {layer.trait_type.value.replace('_', ' ')}",
                      f"tags: {', '.join(layer.tags)}"))


def chunk_key(knowledge_id: str, ordinal: int) -> str:
    return f"{knowledge_id}:{ordinal}"


class _Operation(msgspec.Struct, frozen=True):
    """One change to an index: an upsert by text or vector, or (neither) a removal: of ``key``, or
    without a key, of every entry with these ``attributes``."""

    index: VectorIndex
    key: str
    text: str | None = None
    vector: tuple[float, ...] | None = None
    attributes: dict[str, str] = {}
    tags: tuple[str, ...] = ()


class _Projection:
    """One index and the log position it reflects."""

    def __init__(self, name: str, decider: Decider[Any, Any, Any], attributes: tuple[str, ...],
                 operations: Callable[[VectorIndex, Any], list[_Operation]]) -> None:
        self.name = name
        self.decider = decider
        self.attributes = attributes
        self.operations = operations
        self.index: VectorIndex | None = None
        self.position = 0


def _layer_operations(index: VectorIndex, layer: Layer) -> list[_Operation]:
    if layer.deprecated:
        return [_Operation(index, layer.layer_id)]
    attributes = {"audience": PUBLIC if layer.public else layer.owner, "trait_type": layer.trait_type.value,
                  "base_model": layer.base_model}
    if layer.embedding is not None:
        return [_Operation(index, layer.layer_id, vector=layer.embedding, attributes=attributes, tags=layer.tags)]
    return [_Operation(index, layer.layer_id, text=layer_text(layer), attributes=attributes, tags=layer.tags)]


def _knowledge_operations(index: VectorIndex, knowledge: Knowledge) -> list[_Operation]:
    keys = [chunk_key(knowledge.knowledge_id, i) for i in range(len(knowledge.chunks))]
    if knowledge.removed or knowledge.erased:
        return [_Operation(index, key) for key in keys]
    attributes = {"persona_id": knowledge.persona_id}
    return [_Operation(index, key, text=text, attributes=attributes) for key, text in zip(keys, knowledge.chunks, strict=True)]


class SearchIndexes:
    """This process's layer and knowledge indexes, caught up from the log before each use."""

    def __init__(self, repository: Repository, embedder: Embedder, settings: Settings) -> None:
        self.repository = repository
        self.store = repository.store
        self.embedder = embedder
        self.directory = settings.index_dir or settings.data_dir / "index"
        self.save_every = settings.index_save_every
        self.config = IndexConfig(
            exact_below=settings.index_exact_below, hnsw_m=settings.index_hnsw_m,
            ef_construction=settings.index_ef_construction, ef_search=settings.index_ef_search,
        )
        self.layers = _Projection("layers", LAYER, LAYER_ATTRIBUTES, _layer_operations)
        self.knowledge = _Projection("knowledge", KNOWLEDGE, KNOWLEDGE_ATTRIBUTES, _knowledge_operations)
        self._projections = {p.decider.stream_type: p for p in (self.layers, self.knowledge)}
        self._lock = threading.RLock()
        self._opened = False
        self._saved_at = 0

    @property
    def fingerprint(self) -> str:
        return f"{self.embedder.name}/{self.embedder.dimension}"

    @property
    def position(self) -> int:
        """The position both indexes have reached."""
        return min(p.position for p in self._projections.values())

    def path(self, projection: _Projection) -> Path:
        return self.directory / f"{projection.name}.npz"

    # Keeping up
    def current(self) -> SearchIndexes:
        """Catch up with everything committed so far (read-your-writes); returns self for chaining."""
        if not self._opened or self.store.last_position() > self.position:
            with self._lock:
                self._open()
                self.catch_up()
        return self

    def catch_up(self, progress: Progress | None = None, *, batch_size: int = 1000) -> int:
        """Apply the events past the indexes' positions; save when ``save_every`` events have passed."""
        with self._lock:
            self._open()
            applied, total = 0, self.store.last_position()
            while batch := self.store.read_all(after_position=self.position, limit=batch_size):
                self._apply(batch)
                applied += len(batch)
                if progress is not None:
                    progress(self.position, total)
            if self.position - self._saved_at >= self.save_every:
                self.save()
            return applied

    def rebuild(self, progress: Progress | None = None) -> int:
        """Forget both indexes and fold the whole log into fresh ones; saved at the end."""
        with self._lock:
            for projection in self._projections.values():
                projection.index = VectorIndex(self.embedder.dimension, projection.attributes, self.config)
                projection.position = 0
            self._opened = True
            self.catch_up(progress)
            self.save()
            return self.position

    def save(self) -> None:
        with self._lock:
            for projection in self._projections.values():
                if projection.index is not None:
                    projection.index.save(self.path(projection), position=projection.position, fingerprint=self.fingerprint)
            self._saved_at = self.position

    def save_if_changed(self) -> None:
        """Save what this process applied since the last save (on shutdown)."""
        with self._lock:
            if self._opened and self.position > self._saved_at:
                self.save()

    def _open(self) -> None:
        """Load the saved indexes (or start empty ones), once per process."""
        if self._opened:
            return
        dimension = self.embedder.dimension
        for projection in self._projections.values():
            loaded = VectorIndex.load(self.path(projection), dimension=dimension, attributes=projection.attributes,
                                      config=self.config, fingerprint=self.fingerprint)
            projection.index, projection.position = loaded or (VectorIndex(dimension, projection.attributes, self.config), 0)
        self._saved_at = self.position
        self._opened = True

    def _apply(self, events: Sequence[RecordedEvent]) -> None:
        """Turn events into index operations in log order, embed their texts in one batch, apply them."""
        operations: list[_Operation] = []
        states: dict[str, Any] = {}
        for event in events:
            if isinstance(event.event, PersonaErased) and event.position > self.knowledge.position:
                # Every vector of its knowledge: those its (now unreadable) events added, and those of
                # documents written before sealing existed, which still read in clear.
                assert self.knowledge.index is not None
                operations.append(_Operation(self.knowledge.index, "", attributes={"persona_id": event.stream_id}))
                continue
            projection = self._projections.get(event.stream_type)
            if projection is None or event.position <= projection.position:
                continue
            state = states.get(event.stream_id)
            if state is None and event.version > 1:
                state = self.repository.load(projection.decider, event.stream_id, to_version=event.version - 1).state
            state = states[event.stream_id] = projection.decider.evolve(state, event.event)
            assert projection.index is not None
            operations.extend(projection.operations(projection.index, state))
        texts = list(dict.fromkeys(op.text for op in operations if op.text is not None))
        vectors = dict(zip(texts, self.embedder.embed(texts), strict=True)) if texts else {}
        for op in operations:
            if not op.key:
                op.index.purge(Filter({name: frozenset({value}) for name, value in op.attributes.items()}))
            elif op.text is None and op.vector is None:
                op.index.remove(op.key)
            else:
                vector = vectors[op.text] if op.text is not None else np.asarray(op.vector, dtype=np.float32)
                op.index.upsert(op.key, vector, op.attributes, op.tags)
        for projection in self._projections.values():
            projection.position = max(projection.position, events[-1].position)

    # Searching
    def check_k(self, k: int, limit: int) -> None:
        if not 1 <= k <= limit:
            raise SearchRefused("k_out_of_range", f"k must be within 1..{limit} (got {k})")

    def query_vector(self, text: str | None) -> np.ndarray:
        if text is None or not text.strip():
            raise SearchRefused("query_text_required", "the query text must not be empty")
        return self.embedder.embed([text])[0]

    def search_layers(self, query: np.ndarray, k: int, *, owner: str, trait_type: str | None = None,
                      base_model: str | None = None, tags: Iterable[str] = ()) -> list[Hit]:
        """Layers the owner may see (its own and public ones), most similar first."""
        equals = {"audience": frozenset({PUBLIC, owner})}
        for name, value in (("trait_type", trait_type), ("base_model", base_model)):
            if value is not None:
                equals[name] = frozenset({value})
        where = Filter(equals, frozenset(tag.strip().lower() for tag in tags))
        with self._lock:
            assert self.layers.index is not None
            return self.layers.index.search(query, k, where)

    def layer_vector(self, layer_id: str) -> np.ndarray | None:
        with self._lock:
            index = self.layers.index
            return index.vector(layer_id) if index is not None and layer_id in index else None

    def search_knowledge(self, query: np.ndarray, k: int, persona_id: str) -> list[tuple[Hit, np.ndarray]]:
        """A persona's chunks most similar to the query, with their vectors (for MMR)."""
        with self._lock:
            index = self.knowledge.index
            assert index is not None
            hits = index.search(query, k, Filter({"persona_id": frozenset({persona_id})}))
            return [(hit, index.vector(hit.key)) for hit in hits]

    def has_knowledge(self, persona_id: str) -> bool:
        """Whether the persona has any live chunk: without one a chat embeds no query (and loads no embedder)."""
        statement = sa.select(CHUNKS.c.persona_id).where(CHUNKS.c.persona_id == persona_id).limit(1)
        with self.store.database.read() as connection:
            return connection.execute(statement).first() is not None

    def knowledge_candidates(self, query: np.ndarray, k: int, persona_id: str) -> list[Candidate]:
        """The persona's ``k`` nearest live chunks with their texts (from the read model), best first."""
        hits = self.current().search_knowledge(query, k, persona_id)
        texts = self._chunk_texts(persona_id, {hit.key.rpartition(":")[0] for hit, _ in hits})
        return [Candidate(hit.key, hit.key.rpartition(":")[0], texts[hit.key], hit.score, vector)
                for hit, vector in hits if hit.key in texts]

    def _chunk_texts(self, persona_id: str, knowledge_ids: set[str]) -> dict[str, str]:
        """Chunk key -> text, for the live chunks of these documents of this persona."""
        if not knowledge_ids:
            return {}
        statement = sa.select(CHUNKS.c.knowledge_id, CHUNKS.c.ordinal, CHUNKS.c.text).where(
            CHUNKS.c.persona_id == persona_id, CHUNKS.c.knowledge_id.in_(sorted(knowledge_ids)),
        )
        with self.store.database.read() as connection:
            rows = [dict(row) for row in connection.execute(statement).mappings()]
            key = self.store.sealer.keys.for_reading(connection, [persona_id])[persona_id] if self.store.sealer else None
        texts = {chunk_key(row["knowledge_id"], row["ordinal"]): open_value(key, CHUNKS, row, "text") for row in rows}
        return {chunk: text for chunk, text in texts.items() if text is not None}
