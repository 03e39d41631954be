"""The read side's driver queries on SQLite and PostgreSQL."""

from __future__ import annotations

from factories import attach, create_persona_with_genome, register_layer

from genome_service.projections.queries import get_row_with_children
from genome_service.projections.tables import GENOME_LAYER_REFS, GENOMES
from genome_service.services.bootstrap import Services

REFS = GENOME_LAYER_REFS


def _genome(services: Services, genome_id: str) -> tuple[dict, list[dict]] | None:  # type: ignore[type-arg]
    with services.database.read() as connection:
        return get_row_with_children(connection, GENOMES, "genome_id", genome_id, REFS, "position")


def test_a_genome_and_its_stack_come_in_one_query_in_stack_order(services: Services) -> None:
    create_persona_with_genome(services, "p1", "g1")
    layers = [register_layer(services, f"l{n}") for n in range(3)]
    for weight, layer in zip((0.25, 0.5, 1.0), layers, strict=True):
        attach(services, "g1", layer, weight)
    found = _genome(services, "g1")
    assert found is not None
    row, stack = found
    assert (row["genome_id"], row["owner"], row["version"], row["archived"]) == ("g1", "alice", 4, False)
    assert row["created_at"].tzinfo is not None and row["parent_ids"] == []
    assert [(r["position"], r["layer_id"], r["weight"]) for r in stack] == [(0, "l0", 0.25), (1, "l1", 0.5), (2, "l2", 1.0)]


def test_a_genome_without_layers_has_an_empty_stack_and_a_missing_one_is_none(services: Services) -> None:
    create_persona_with_genome(services, "p1", "g1")
    found = _genome(services, "g1")
    assert found is not None and found[0]["genome_id"] == "g1" and found[1] == []
    assert _genome(services, "nope") is None
