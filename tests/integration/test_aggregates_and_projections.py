"""Aggregates through the command handler, and the read models derived from them."""

from __future__ import annotations

import pytest
import sqlalchemy as sa
from factories import BASE_MODEL, attach, create_persona_with_genome, register_layer

from genome_service.domain.common import DomainError
from genome_service.domain.genome import GENOME, AttachLayer, LayerFacts, ReweightLayer
from genome_service.domain.persona import PERSONA, AssignGenome, GenomeFacts
from genome_service.eventstore.errors import ConcurrencyConflict
from genome_service.eventstore.records import EventMetadata
from genome_service.projections.read_models import READ_MODELS
from genome_service.services.bootstrap import Services, build


def read_model_rows(services: Services) -> dict[str, list[tuple]]:
    with services.database.read() as connection:
        return {
            table.name: [tuple(r) for r in connection.execute(sa.select(table).order_by(*table.primary_key.columns))]
            for model in READ_MODELS
            for table in model.tables
        }


def genome_with_history(services: Services, reweights: int = 20) -> None:
    create_persona_with_genome(services, "p1", "g1")
    layers = [register_layer(services, f"l{i}") for i in range(3)]
    for layer in layers:
        attach(services, "g1", layer)
    for i in range(reweights):
        services.commands.execute(GENOME, "g1", ReweightLayer(f"l{i % 3}", round(i / reweights, 3)))


def test_snapshot_plus_tail_replay_equals_full_replay(services: Services) -> None:
    genome_with_history(services)  # 24 genome events; snapshots every 5
    with_snapshot = services.repository.load(GENOME, "g1")
    full = services.repository.load(GENOME, "g1", use_snapshot=False)
    assert with_snapshot == full
    assert full.version == 24
    with services.database.read() as connection:
        assert connection.exec_driver_sql("SELECT version FROM snapshots WHERE stream_id = 'g1'").scalar() == 20


def test_time_travel_returns_the_state_at_that_version_and_time(services: Services) -> None:
    genome_with_history(services)
    events = services.store.read_stream("g1")
    for version in (1, 4, 7, 21, 24):
        expected = GENOME.fold(None, [e.event for e in events[:version]])
        assert services.repository.load(GENOME, "g1", to_version=version).state == expected
        as_of = services.repository.load(GENOME, "g1", as_of=events[version - 1].recorded_at)
        assert as_of.version >= version and as_of.state == GENOME.fold(None, [e.event for e in events[: as_of.version]])
    assert len(services.repository.load(GENOME, "g1", to_version=2).state.layers) == 1


@pytest.mark.parametrize(
    ("command", "rule"),
    [
        (AttachLayer(LayerFacts("l0", BASE_MODEL, deprecated=False)), "layer_already_attached"),
        (AttachLayer(LayerFacts("other", "llama-3-8b", deprecated=False)), "base_model_mismatch"),
        (ReweightLayer("l0", 1.5), "weight_out_of_range"),
        (ReweightLayer("missing", 0.5), "layer_not_attached"),
    ],
)
def test_a_command_that_breaks_an_invariant_is_refused_and_appends_nothing(services: Services, command, rule) -> None:  # type: ignore[no-untyped-def]
    genome_with_history(services, reweights=0)
    before = services.store.last_position(), read_model_rows(services)
    with pytest.raises(DomainError) as refused:
        services.commands.execute(GENOME, "g1", command)
    assert refused.value.rule == rule
    assert (services.store.last_position(), read_model_rows(services)) == before


def test_assigning_another_personas_genome_is_refused(services: Services) -> None:
    create_persona_with_genome(services, "p1", "g1")
    create_persona_with_genome(services, "p2", "g2")
    with pytest.raises(DomainError, match="created for persona p2") as refused:
        services.commands.execute(PERSONA, "p1", AssignGenome(GenomeFacts("g2", "p2", archived=False)))
    assert refused.value.rule == "genome_of_other_persona"


def test_a_stale_expected_version_is_a_conflict_and_changes_nothing(services: Services) -> None:
    genome_with_history(services, reweights=0)
    with pytest.raises(ConcurrencyConflict):
        services.commands.execute(GENOME, "g1", ReweightLayer("l0", 0.1), expected_version=2)
    assert services.repository.load(GENOME, "g1").state.layers[0].weight == 0.5


def test_an_idempotent_command_retry_appends_nothing(services: Services) -> None:
    genome_with_history(services, reweights=0)
    meta = EventMetadata(idempotency_key="attach-l9")
    layer = register_layer(services, "l9")
    first = services.commands.execute(GENOME, "g1", AttachLayer(layer, 0.3), metadata=meta)
    retry = services.commands.execute(GENOME, "g1", AttachLayer(layer, 0.3), metadata=meta)
    assert retry.replayed and retry.events == first.events
    assert services.store.stream_version("g1") == first.aggregate.version


def test_inline_read_models_equal_a_rebuild(services: Services) -> None:
    genome_with_history(services)
    services.commands.execute(PERSONA, "p1", AssignGenome(GenomeFacts("g1", "p1", archived=False)))
    live = read_model_rows(services)
    assert [row[3] for row in live["genome_layer_refs"]] == [0.9, 0.95, 0.85]  # weights after the last reweights
    assert services.projector.rebuild() == services.store.last_position()
    assert read_model_rows(services) == live


def test_a_process_that_appends_without_projecting_is_caught_up(services: Services) -> None:
    bare = build(services.settings, database=services.database, inline_projections=False)
    genome_with_history(bare, reweights=3)
    assert read_model_rows(services)["genomes"] == []
    # An inline append after a gap first applies the gap, so nothing is skipped.
    services.commands.execute(GENOME, "g1", ReweightLayer("l0", 0.25))
    rows = read_model_rows(services)
    assert rows["layers"] and rows["genomes"][0][-3] == services.store.stream_version("g1")
    bare.commands.execute(GENOME, "g1", ReweightLayer("l1", 0.75))
    assert services.projector.catch_up() == 1
    caught_up = read_model_rows(services)
    services.projector.rebuild()
    assert read_model_rows(services) == caught_up
