import pytest
import sqlalchemy as sa

from genome_service.eventstore.migrations import check, downgrade, upgrade

TABLES = {
    "events", "snapshots", "idempotency_keys", "projection_checkpoints",
    "genomes", "genome_layer_refs", "layers", "personas", "academy_sessions", "api_keys", "recipes", "recipe_runs", "training_files",
}


def _tables(url: str) -> set[str]:
    engine = sa.create_engine(url.replace("postgresql://", "postgresql+psycopg://"))
    try:
        return set(sa.inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_creates_every_table_and_models_do_not_drift(database_url: str) -> None:
    assert TABLES <= _tables(database_url)
    check(database_url)


def test_downgrade_to_base_removes_every_table_and_upgrade_restores_them(database_url: str) -> None:
    downgrade(database_url, "base")
    assert _tables(database_url) == {"alembic_version"}
    upgrade(database_url)
    assert TABLES <= _tables(database_url)


def test_the_database_refuses_update_and_delete_on_events(services) -> None:  # type: ignore[no-untyped-def]
    from genome_service.domain.persona import PERSONA, CreatePersona

    services.commands.execute(PERSONA, "p1", CreatePersona("p1", "alice", "Ada"))
    for statement in ("UPDATE events SET type = 'Forged'", "DELETE FROM events"):
        with pytest.raises(sa.exc.DatabaseError, match="append-only"):
            with services.database.write() as connection:
                connection.exec_driver_sql(statement)
    assert [e.type for e in services.store.read_stream("p1")] == ["PersonaCreated"]
