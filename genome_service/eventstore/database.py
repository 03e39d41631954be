"""Engines and transactions for SQLite (WAL, embedded default) and PostgreSQL.

SQLite writers start with ``BEGIN IMMEDIATE``: they take the write lock before
their first read, so a read-then-append never fails half-way on a lock upgrade,
and writers queue on ``busy_timeout`` instead. Readers use a separate engine with
plain ``BEGIN`` and never block writers under WAL.

Both databases take one writer at a time (SQLite by its file lock, our
PostgreSQL appends by ``LOCK TABLE``), so a process keeps one open write
connection behind a lock: threads queue in-process instead of polling the
database, and no write pays for a pool checkout.

Reads keep one open connection per thread for the same reason: a pool checkout
and its reset cost more than the indexed lookup of a GET by id. Each read ends
its transaction when the outermost ``read()`` exits, so the next one sees every
commit since. ``read_through`` goes further on SQLite: a value read by key is reused
until any process commits a write (see ``changes``).

Both context managers are the boundary for an unreachable database: a driver error that
means it (``driver.unavailable``) leaves them as ``DatabaseUnavailable``. Each such error
counts an outage, and every kept connection opened before the latest outage is replaced at
its next use (a terminated server session stays dead even once the database is back), so the
process recovers by itself, without a failed request per thread.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, NoReturn, TypeVar

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Connection, Engine

from genome_service.eventstore.changes import ChangeToken, ReadCache
from genome_service.eventstore.driver import unavailable, unstorable
from genome_service.settings import Settings

T = TypeVar("T")

Dialect = Literal["sqlite", "postgresql"]
# Seconds to wait for a PostgreSQL server to accept a connection (unless the URL says otherwise):
# an unreachable host answers 503 soon instead of holding requests for the OS's TCP timeout.
POSTGRES_CONNECT_TIMEOUT = 5


class _ThreadReader(threading.local):
    """A thread's read connection, how many ``read()`` blocks it is inside, and the outage count it was opened at."""

    connection: Connection | None = None
    depth = 0
    outages = 0


def normalise_url(url: str) -> str:
    """Route ``postgresql://`` URLs to psycopg 3, the driver we pin."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def sqlite_file(url: str) -> Path | None:
    """The file of a SQLite URL; None for an in-memory database or another kind of database."""
    parsed = sa.engine.make_url(url)
    name = parsed.database
    if parsed.get_backend_name() != "sqlite" or not name or name == ":memory:" or name.startswith("file:"):
        return None
    return Path(name)


class Database:
    def __init__(
        self, url: str, *, sqlite_synchronous: str = "NORMAL", sqlite_busy_timeout: float = 30.0, read_cache: bool = True,
    ) -> None:
        self.url = normalise_url(url)
        backend = sa.engine.make_url(self.url).get_backend_name()
        if backend not in ("sqlite", "postgresql"):
            raise ValueError(f"unsupported database {backend!r}: use a sqlite:/// or postgresql:// URL")
        self.dialect: Dialect = backend  # type: ignore[assignment]
        self._writer_lock = threading.Lock()
        self._writer: Connection | None = None
        self._writer_outages = 0
        # How many times a connection found the database unreachable (see the module's docstring).
        self._outages = 0
        self._local = _ThreadReader()
        self._readers_lock = threading.Lock()
        self._readers: dict[threading.Thread, Connection] = {}
        self.changes: ChangeToken | None = None
        if self.dialect == "sqlite":
            self.write_engine = self._sqlite_engine(sqlite_synchronous, sqlite_busy_timeout, "BEGIN IMMEDIATE")
            self.read_engine = self._sqlite_engine(sqlite_synchronous, sqlite_busy_timeout, "BEGIN")
            path = sqlite_file(self.url)
            if path is not None:
                self.changes = ChangeToken(path)
        else:
            parsed = sa.engine.make_url(self.url)
            connect_args = {} if "connect_timeout" in parsed.query else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT}
            self.write_engine = self.read_engine = sa.create_engine(
                self.url, pool_size=8, max_overflow=64, pool_pre_ping=True, connect_args=connect_args
            )
        self._read_cache = ReadCache(self.changes if read_cache else None)

    @classmethod
    def from_settings(cls, settings: Settings) -> Database:
        if not settings.database_url:
            settings.data_dir.mkdir(parents=True, exist_ok=True)
        return cls(
            settings.resolved_database_url,
            sqlite_synchronous=settings.sqlite_synchronous,
            sqlite_busy_timeout=settings.sqlite_busy_timeout,
            read_cache=settings.read_cache,
        )

    def _sqlite_engine(self, synchronous: str, busy_timeout: float, begin: str) -> Engine:
        engine = sa.create_engine(
            self.url,
            pool_size=8,
            max_overflow=64,
            connect_args={"timeout": busy_timeout, "check_same_thread": False},
        )

        @event.listens_for(engine, "connect")
        def _on_connect(dbapi_connection, _record) -> None:  # type: ignore[no-untyped-def]
            # Take transaction control from the sqlite3 module so that our BEGIN is the one issued.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA synchronous={synchronous}")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.close()

        @event.listens_for(engine, "begin")
        def _on_begin(connection: Connection) -> None:
            # On the driver connection: SQLAlchemy's execution machinery would cost more than the BEGIN.
            connection.connection.driver_connection.execute(begin)  # type: ignore[union-attr]

        return engine

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A write transaction on this process's writer; commits on success, rolls back on error."""
        with self._writer_lock:
            try:
                connection = self._writer
                if connection is None or connection.closed or connection.invalidated or self._writer_outages != self._outages:
                    connection = self._open_writer()
                with connection.begin():
                    yield connection
            except Exception as error:
                if (down := unavailable(error)) is None:
                    _raise_unstorable_or_reraise(error)
                self._outages += 1
                _discard(self._writer)
                self._writer = None
                if down is error:
                    raise
                raise down from error
            finally:
                # After the commit is visible and before the caller answers anyone; on a
                # rollback too, since a failed commit may still have reached the file.
                if self.changes is not None:
                    self.changes.replace()

    @contextmanager
    def read(self) -> Iterator[Connection]:
        """This thread's read connection; nested calls share it, the outermost ends its transaction."""
        local = self._local
        try:
            connection = local.connection
            if (
                connection is None or connection.closed or connection.invalidated
                or (local.outages != self._outages and local.depth == 0)
            ):
                local.outages = self._outages
                connection = local.connection = self._new_reader()
            local.depth += 1
            try:
                yield connection
            finally:
                local.depth -= 1
                # The thread's connection now: a nested read may have dropped this one and opened another.
                if local.depth == 0 and local.connection is not None:
                    self._end_read(local.connection)
        except Exception as error:
            if (down := unavailable(error)) is None:
                _raise_unstorable_or_reraise(error)
            self._outages += 1
            self._drop_reader()
            if down is error:
                raise
            raise down from error

    def read_through(self, key: Hashable, load: Callable[[Connection], T]) -> T:
        """``load`` on a read connection, or its value from an earlier call with the same key
        if nothing has been committed since (SQLite files; PostgreSQL always loads).
        The value is shared between callers: cache only what nobody mutates."""

        def loaded() -> T:
            with self.read() as connection:
                return load(connection)

        return self._read_cache.get(key, loaded)

    def _new_reader(self) -> Connection:
        connection = self.read_engine.connect()
        with self._readers_lock:
            # Threads come and go (a thread pool's workers); their connections go back to the pool.
            for thread in [t for t in self._readers if not t.is_alive()]:
                self._readers.pop(thread).close()
            # This thread's previous one was closed, broken, or opened before an outage: never back to the pool.
            _discard(self._readers.pop(threading.current_thread(), None))
            self._readers[threading.current_thread()] = connection
        return connection

    def _end_read(self, connection: Connection) -> None:
        if connection.invalidated:
            return
        try:
            if connection.in_transaction():
                connection.rollback()
            else:
                # Driver-level reads may have opened a transaction SQLAlchemy does not know about
                # (psycopg starts one on the first statement); rollback is free when there is none.
                connection.connection.dbapi_connection.rollback()  # type: ignore[union-attr]
        except Exception:
            connection.invalidate()
            raise

    def _drop_reader(self) -> None:
        """Forget this thread's read connection: the database could not be reached on it."""
        connection, self._local.connection = self._local.connection, None
        with self._readers_lock:
            self._readers.pop(threading.current_thread(), None)
        _discard(connection)

    def _open_writer(self) -> Connection:
        """A new writer, replacing one that is closed, broken, or opened before the latest outage."""
        _discard(self._writer)
        self._writer = None
        self._writer_outages = self._outages
        self._writer = self.write_engine.connect()
        return self._writer

    def sql(self, statement: str) -> str:
        """Write driver SQL once with ``?`` placeholders; psycopg wants ``%s``."""
        return statement if self.dialect == "sqlite" else statement.replace("?", "%s")

    def to_db_time(self, moment: datetime) -> object:
        """SQLite keeps event times as fixed-width ISO 8601 text in UTC, so text order is time order."""
        if self.dialect == "sqlite":
            return moment.astimezone(UTC).isoformat(sep=" ", timespec="microseconds")
        return moment

    def from_db_time(self, value: object) -> datetime:
        if isinstance(value, datetime):
            return value if value.tzinfo else value.replace(tzinfo=UTC)
        return datetime.fromisoformat(value)  # type: ignore[arg-type]

    def dispose(self) -> None:
        with self._writer_lock:
            if self._writer is not None:
                self._writer.close()
                self._writer = None
        with self._readers_lock:
            for connection in self._readers.values():
                connection.close()
            self._readers.clear()
        self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            self.read_engine.dispose()


def _discard(connection: Connection | None) -> None:
    """Close a connection for good, not back into the pool: it may be broken."""
    if connection is not None and not connection.closed and not connection.invalidated:
        connection.invalidate()


def _raise_unstorable_or_reraise(error: Exception) -> NoReturn:
    # A value the database refused leaves as the store's own error; anything else unchanged.
    if (refused := unstorable(error)) is not None and refused is not error:
        raise refused from error
    raise error
