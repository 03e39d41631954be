"""Erasing a persona's personal data: crypto-shredding its key, deleting its rows, scrubbing old pages.

``PersonaErased`` (which holds no personal data) is recorded, the persona's data
key shredded and its knowledge and conversation rows deleted in one transaction.
Afterwards its sealed values read back as ``erased`` everywhere: replays,
projection rebuilds, index rebuilds. Layers trained on its knowledge are marked erased and
their adapter blobs deleted: the weights carry the facts they learnt.
"""

from __future__ import annotations

import sqlalchemy as sa

from genome_service.domain.persona import PERSONA, ErasePersona
from genome_service.eventstore.driver import execute_chunks
from genome_service.eventstore.records import EventMetadata, Expect
from genome_service.projections.tables import ACADEMY_SESSIONS
from genome_service.services.blobs import shred
from genome_service.services.bootstrap import Services
from genome_service.services.layers import erase_personal_layers

# Tables whose deleted rows may have held personal text (in clear, if written before sealing).
TOUCHED_TABLES = ("personal_data_keys", "knowledge", "knowledge_chunks", "conversations", "conversation_messages",
                  "snapshots", "personas")


def erase_persona(services: Services, persona_id: str, metadata: EventMetadata) -> None:
    """Erase a persona's personal data for good. Raises ``DomainError`` (``persona_erased``) the second time."""
    database = services.database
    # First, and idempotent: a crash after it leaves the persona to erase again, which redoes it.
    erase_personal_layers(services, persona_id, metadata)
    _shred_checkpoints(services, persona_id)
    with database.write() as connection:
        current = services.repository.load(PERSONA, persona_id, connection=connection)
        events = PERSONA.decide(ErasePersona(), current.state)
        result = services.store.append_in(connection, persona_id, PERSONA.stream_type, events,
                                          current.version or Expect.NO_STREAM, metadata)
        services.projector.apply_inline(connection, result, current.extend(PERSONA, result.events))
        secure = database.dialect == "sqlite"
        if secure:
            # Zero the deleted cells and freed pages instead of only unlinking them.
            connection.exec_driver_sql("PRAGMA secure_delete = ON")
        try:
            services.data_keys.shred(connection, persona_id)
            _delete_snapshots(connection, services.projector.forget(connection, persona_id))
        finally:
            if secure:
                connection.exec_driver_sql("PRAGMA secure_delete = OFF")
    _scrub(services)
    services.search.current().save()


def _shred_checkpoints(services: Services, persona_id: str) -> None:
    """The persona's academy sessions' training checkpoints: weights (and optimizer moments)
    trained on its knowledge, as much its data as the layer they became."""
    query = sa.select(ACADEMY_SESSIONS.c.session_id).where(ACADEMY_SESSIONS.c.persona_id == persona_id)
    with services.database.read() as connection:
        sessions = list(connection.execute(query).scalars())
    for session_id in sessions:
        folder = services.settings.data_dir / "academy" / session_id
        if folder.exists():
            shred(folder)


def _delete_snapshots(connection, streams: list[str]) -> None:  # type: ignore[no-untyped-def]
    # Streams of personal data are no longer snapshotted, but ones written before may be.
    execute_chunks(connection, "DELETE FROM snapshots WHERE stream_id IN ({})", streams)


def _scrub(services: Services) -> None:
    """Leave no copy of what was deleted where the database keeps old pages: SQLite's WAL, PostgreSQL's dead rows."""
    database = services.database
    if database.dialect == "sqlite":
        raw = database.write_engine.raw_connection()
        try:
            raw.cursor().execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            raw.close()
        return
    with database.write_engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
        connection.exec_driver_sql(f"VACUUM {', '.join(TOUCHED_TABLES)}")
