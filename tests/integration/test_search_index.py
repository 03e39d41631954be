"""The search indexes as projections of the log: visibility, read-your-writes, rebuild, SIGKILL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest
from factories import register_layer, run_until_killed
from test_aggregates_and_projections import read_model_rows

from genome_service.domain.knowledge import KNOWLEDGE, RemoveKnowledge
from genome_service.domain.layer import LAYER, ChangeLayerDetails, DeprecateLayer
from genome_service.domain.persona import PERSONA, CreatePersona
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services, build
from genome_service.services.knowledge import add_knowledge
from genome_service.services.indexes import SearchIndexes
from genome_service.settings import Settings
from rag.embedder import SentenceTransformerEmbedder
from rag.index import VectorIndex

QUERIES = ("math tutor", "a poet with a warm voice", "ethics of medicine", "layer 7", "cooking", "tags: tutor")


@pytest.fixture
def searchable(database, tmp_path: Path, embedder: SentenceTransformerEmbedder) -> Iterator[Services]:  # type: ignore[no-untyped-def]
    settings = Settings(data_dir=tmp_path, database_url=database.url, index_exact_below=16, index_save_every=7)
    yield build(settings, database=database, embedder=embedder)


def results(search: SearchIndexes, owner: str = "alice") -> list[list[tuple[str, float]]]:
    search.current()
    return [[tuple(hit) for hit in search.search_layers(search.query_vector(q), 10, owner=owner)] for q in QUERIES]


def test_private_layers_stay_private_and_changes_show_at_once(searchable: Services) -> None:
    search = searchable.search
    for i in range(6):
        register_layer(searchable, f"a{i}")
        register_layer(searchable, f"b{i}", owner="bob")
    seen = {key for row in results(search) for key, _ in row}
    assert seen == {f"a{i}" for i in range(6)}
    searchable.commands.execute(LAYER, "b0", ChangeLayerDetails(public=True))
    searchable.commands.execute(LAYER, "a1", DeprecateLayer("superseded"))
    seen = {key for row in results(search) for key, _ in row}
    assert "b0" in seen and "a1" not in seen and not seen & {f"b{i}" for i in range(1, 6)}


def test_knowledge_is_searched_per_persona_and_a_removed_document_leaves_at_once(searchable: Services) -> None:
    for persona in ("p1", "p2"):
        searchable.commands.execute(PERSONA, persona, CreatePersona(persona, "alice", persona))
    meta = EventMetadata(actor="alice")
    cats = add_knowledge(searchable, "alice", "p1", "cats", "text/plain", "Cats purr and sleep most of the day. " * 40, meta)
    add_knowledge(searchable, "alice", "p2", "dogs", "text/plain", "Dogs bark at the postman.", meta)
    search = searchable.search.current()
    hits = search.search_knowledge(search.query_vector("why do cats purr"), 10, "p1")
    assert hits and {hit.key.rpartition(":")[0] for hit, _ in hits} == {cats.aggregate.stream_id}
    assert len(hits) == len(cats.aggregate.state.chunks) > 1  # chunked with overlap
    searchable.commands.execute(KNOWLEDGE, cats.aggregate.stream_id, RemoveKnowledge())
    assert searchable.search.current().search_knowledge(search.query_vector("why do cats purr"), 10, "p1") == []
    live = read_model_rows(searchable)
    assert len(live["knowledge"]) == 2 and len(live["knowledge_chunks"]) == 1  # a removed document keeps no text
    searchable.projector.rebuild()
    assert read_model_rows(searchable) == live


WRITER = """
import sys
sys.path.insert(0, {tests!r})
from factories import register_layer
from genome_service.domain.layer import LAYER, ChangeLayerDetails, DeprecateLayer
from genome_service.services.bootstrap import build
from genome_service.settings import Settings
from pathlib import Path

services = build(Settings(database_url={url!r}, data_dir=Path({data!r}), index_exact_below=16, index_save_every=7))
for n in range(1_000_000):
    register_layer(services, f"l{{n}}", owner="alice" if n % 3 else "bob")
    if n % 5 == 4:
        services.commands.execute(LAYER, f"l{{n - 2}}", DeprecateLayer("replaced"))
    if n % 7 == 6:
        services.commands.execute(LAYER, f"l{{n - 1}}", ChangeLayerDetails(description=f"tutor number {{n}}", public=True))
    services.search.current()
    print("indexed", services.search.position, flush=True)
"""


def test_an_index_killed_mid_write_then_loaded_and_caught_up_answers_like_a_rebuilt_one(
    searchable: Services, tmp_path: Path, embedder: SentenceTransformerEmbedder,
) -> None:
    data = tmp_path / "writer"
    script = WRITER.format(tests=str(Path(__file__).parents[1]), url=searchable.database.url, data=str(data))
    run_until_killed(script, 45)  # past the switch to HNSW (16), with tombstones and public flips
    register_layer(searchable, "after-the-crash")  # the log moved on past the last save

    settings = msgspec.structs.replace(searchable.settings, index_dir=data / "index")
    restarted = build(settings, database=searchable.database, embedder=embedder).search
    saved = VectorIndex.saved_position(restarted.path(restarted.layers))
    assert saved is not None and 0 < saved < searchable.store.last_position()
    rebuilt = build(msgspec.structs.replace(settings, index_dir=tmp_path / "fresh"), database=searchable.database, embedder=embedder).search
    rebuilt.rebuild()

    assert restarted.current().layers.index.hnsw
    for owner in ("alice", "bob"):
        assert results(restarted, owner) == results(rebuilt, owner)
    assert restarted.layers.index.tombstones == rebuilt.layers.index.tombstones
