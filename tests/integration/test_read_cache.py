"""Database.read_through: a value read by key is served again until any process commits a write."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa
from factories import attach, create_persona_with_genome, register_layer

from genome_service.eventstore.changes import TOKEN_BYTES, ChangeToken
from genome_service.eventstore.database import Database, sqlite_file
from genome_service.eventstore.migrations import upgrade
from genome_service.services.bootstrap import Services

COUNT_KEYS = "SELECT count(*) FROM api_keys"


class CountingLoader:
    """Counts how often the database was really asked."""

    def __init__(self, statement: str) -> None:
        self.statement, self.calls = statement, 0

    def __call__(self, connection: sa.Connection) -> int:
        self.calls += 1
        return int(connection.exec_driver_sql(self.statement).scalar_one())


def test_a_value_is_read_once_until_a_write_commits(services: Services) -> None:
    database = services.database
    load = CountingLoader("SELECT count(*) FROM events")
    first = database.read_through("events", load)
    assert [database.read_through("events", load) for _ in range(3)] == [first] * 3
    if database.dialect == "postgresql":
        # Servers on several hosts share no memory: every read goes to the database.
        assert database.changes is None and load.calls == 4
        return
    assert load.calls == 1
    create_persona_with_genome(services, "p1", "g1")  # appends through Database.write()
    assert database.read_through("events", load) == first + 2
    assert load.calls == 2


def test_a_write_in_another_process_is_seen_at_once(sqlite_url: str) -> None:
    database = Database(sqlite_url)
    load = CountingLoader(COUNT_KEYS)
    try:
        assert database.read_through("keys", load) == 0
        assert database.read_through("keys", load) == 0 and load.calls == 1
        data_dir = Path(sa.engine.make_url(sqlite_url).database or "").parent
        created = subprocess.run(
            [sys.executable, "-m", "genome_service.cli", "--data-dir", str(data_dir), "--database-url", sqlite_url,
             "keys", "create", "--owner", "bob"],
            capture_output=True, text=True, timeout=120, check=False,
        )
        assert created.returncode == 0, created.stderr
        assert database.read_through("keys", load) == 1
        assert load.calls == 2
    finally:
        database.dispose()


def test_a_genome_read_by_the_api_path_follows_every_change(services: Services) -> None:
    """The cached value is what a fresh read would give, after each kind of change."""
    from genome_service.services.genomes import read_genome

    def read() -> tuple[int, list[str]] | None:
        genome = services.database.read_through(("genome", "g1"), lambda c: read_genome(c, "g1"))
        return None if genome is None else (genome.version, [s.layer_id for s in genome.layers])

    assert read() is None
    create_persona_with_genome(services, "p1", "g1")
    assert read() == (1, [])
    layer = register_layer(services, "l1")
    assert read() == (1, [])
    attach(services, "g1", layer, 0.5)
    assert read() == (2, ["l1"])


def test_migrations_replace_the_token(sqlite_url: str) -> None:
    path = Path(sa.engine.make_url(sqlite_url).database or "")
    token = ChangeToken(path)
    before = token.current()
    upgrade(sqlite_url)  # already at head: alembic may write nothing, the token moves anyway
    assert token.current() != before


def test_a_token_file_cut_short_is_made_whole(tmp_path: Path) -> None:
    database_path = tmp_path / "genome.db"
    (tmp_path / "genome.db-changes").write_bytes(b"\x01\x02")
    token = ChangeToken(database_path)
    assert len(token.current()) == TOKEN_BYTES
    seen = token.current()
    token.replace()
    assert token.current() != seen
    assert ChangeToken(database_path).current() == token.current()  # one file, shared


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "sqlite:///file:shared?mode=memory&uri=true"])
def test_an_in_memory_database_has_no_file_for_a_token(url: str) -> None:
    assert sqlite_file(url) is None


def test_a_file_database_has_its_token_beside_it(tmp_path: Path) -> None:
    assert sqlite_file(f"sqlite:///{tmp_path / 'genome.db'}") == tmp_path / "genome.db"
    assert sqlite_file("postgresql+psycopg://postgres@127.0.0.1/test") is None
    assert ChangeToken(tmp_path / "genome.db").path == tmp_path / "genome.db-changes"


def test_with_the_cache_off_every_read_goes_to_the_database_and_writes_still_signal(sqlite_url: str) -> None:
    plain, cached = Database(sqlite_url, read_cache=False), Database(sqlite_url)
    load, cached_load = CountingLoader(COUNT_KEYS), CountingLoader(COUNT_KEYS)
    try:
        plain.read_through("keys", load)
        plain.read_through("keys", load)
        assert load.calls == 2
        cached.read_through("keys", cached_load)
        with plain.write() as connection:  # a server without the cache still tells the others
            connection.exec_driver_sql("INSERT INTO api_keys (key_id, owner, key_hash, created_at) VALUES ('k', 'o', 'h', '2026-01-01 00:00:00')")
        assert cached.read_through("keys", cached_load) == 1 and cached_load.calls == 2
    finally:
        plain.dispose()
        cached.dispose()
