"""The event store and the read path while the database cannot be reached, and after it is back.

Run on a SQLite file whose locks another process holds, and on a PostgreSQL database closed
to connections with its sessions terminated. Nothing above the boundary sees a driver error.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from outages import postgres_database, sqlite_locked

from genome_service.domain.persona import PersonaProfileChanged
from genome_service.eventstore.database import Database
from genome_service.eventstore.driver import fetch_one
from genome_service.eventstore.errors import DatabaseUnavailable
from genome_service.eventstore.migrations import upgrade
from genome_service.eventstore.records import Expect
from genome_service.eventstore.store import EventStore
from genome_service.projections.queries import get_row
from genome_service.projections.tables import PersonaRow
from genome_service.services.bootstrap import domain_codec

PERSONAS: sa.Table = PersonaRow.__table__  # type: ignore[attr-defined]
DRIVER_ERRORS = (sqlite3.OperationalError, psycopg.OperationalError, sa.exc.OperationalError)
Outage = Callable[[], AbstractContextManager[None]]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def unreachable(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Outage]]:
    """A migrated database's URL, and a context inside which it cannot be reached."""
    if request.param == "sqlite":
        file = tmp_path / "genome.db"
        upgrade(f"sqlite:///{file}")
        yield f"sqlite:///{file}", lambda: sqlite_locked(file)
        return
    with postgres_database(request.getfixturevalue("postgres_server")) as database:
        yield database.url, database.closed


@pytest.fixture
def store(unreachable: tuple[str, Outage]) -> Iterator[EventStore]:
    database = Database(unreachable[0], sqlite_busy_timeout=0.2, read_cache=False)
    yield EventStore(database, domain_codec())
    database.dispose()


def _note(text: str) -> PersonaProfileChanged:
    return PersonaProfileChanged(description=text)


def _unavailable(call: Callable[[], Any]) -> DatabaseUnavailable:
    started = time.monotonic()
    with pytest.raises(DatabaseUnavailable) as raised:
        call()
    assert time.monotonic() - started < 3, "an unreachable database is reported soon, not waited on"
    assert isinstance(raised.value.__cause__, DRIVER_ERRORS)
    return raised.value


def test_writes_and_reads_raise_database_unavailable_while_it_is_down_and_work_again_after(
    store: EventStore, unreachable: tuple[str, Outage],
) -> None:
    database = store.database
    store.append("s1", "persona", [_note("before")], Expect.NO_STREAM)
    persona = lambda: database.read_through(("personas", "p1"), lambda c: get_row(c, PERSONAS, "persona_id", "p1"))  # noqa: E731
    assert persona() is None

    with unreachable[1]():
        _unavailable(lambda: store.append("s1", "persona", [_note("during")], 1))
        _unavailable(lambda: store.read_stream("s1"))
        _unavailable(persona)
        # Again, now on the fresh connections that replaced the ones that met the outage.
        _unavailable(lambda: store.append("s1", "persona", [_note("during")], 1))
        _unavailable(lambda: store.stream_version("s1"))

    store.append("s1", "persona", [_note("after")], 1)
    assert [e.event.description for e in store.read_stream("s1")] == ["before", "after"]
    assert persona() is None


def test_a_thread_that_met_no_error_reads_again_at_once_after_the_outage(
    store: EventStore, unreachable: tuple[str, Outage],
) -> None:
    store.append("s1", "persona", [_note("before")], Expect.NO_STREAM)
    with ThreadPoolExecutor(max_workers=1) as other:
        # That thread's read connection is opened before the outage (on PostgreSQL its session is then terminated).
        assert other.submit(store.stream_version, "s1").result() == 1
        with unreachable[1]():
            _unavailable(lambda: store.stream_version("s1"))
        assert other.submit(store.stream_version, "s1").result() == 1


def test_a_bad_statement_is_not_taken_for_an_unreachable_database(store: EventStore) -> None:
    with pytest.raises((sqlite3.OperationalError, psycopg.errors.UndefinedColumn)), store.database.read() as connection:
        fetch_one(connection, "SELECT no_such_column FROM events")
    assert store.stream_version("s1") == 0
