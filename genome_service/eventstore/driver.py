"""Statements on the driver's own cursor, and the one test that tells an unreachable database from a bad query.

The hot paths (a GET by id, an append) run their statements here rather than through
SQLAlchemy's execution machinery, which cost more than the indexed lookup itself. Any
driver error that means "the database cannot be reached now" leaves as ``DatabaseUnavailable``.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn, TypeVar, overload

import psycopg
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import Connection

from genome_service.eventstore.errors import DatabaseUnavailable, EventStoreError, UnstorableValue

R = TypeVar("R", bound=tuple[Any, ...])
Params = Sequence[Any]

# SQLite result codes (with their extended forms) for "the file cannot be used now", not "the
# statement is wrong": a lock held past the busy timeout, a file that cannot be opened, failing I/O.
_SQLITE_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_CANTOPEN", "SQLITE_IOERR")


def unavailable(error: BaseException) -> DatabaseUnavailable | None:
    """``error`` as ``DatabaseUnavailable`` when it means the database cannot be reached now; None otherwise."""
    if isinstance(error, DatabaseUnavailable):
        return error
    if isinstance(error, sa_exc.DBAPIError):
        cause: BaseException = error.orig
        down = error.connection_invalidated or _driver_unavailable(cause)
    else:
        cause = error
        # Pre-ping found no live server, or no pooled connection came free in time.
        down = isinstance(error, (sa_exc.DisconnectionError, sa_exc.TimeoutError)) or _driver_unavailable(error)
    if not down:
        return None
    reason = str(cause).strip().splitlines()
    return DatabaseUnavailable(f"the database cannot be reached: {reason[0] if reason else type(cause).__name__}")


def unstorable(error: BaseException) -> UnstorableValue | None:
    """``error`` as ``UnstorableValue`` when the database refused a value itself (not the statement)."""
    cause = error.orig if isinstance(error, sa_exc.DBAPIError) else error
    if isinstance(error, sa_exc.DataError) or isinstance(cause, psycopg.DataError):
        return UnstorableValue("text values cannot contain NUL characters or invalid byte sequences")
    return None


def store_error(error: BaseException) -> EventStoreError | None:
    """The store's own error for a driver error at the boundary, or None for one it does not know."""
    return unavailable(error) or unstorable(error)


def _driver_unavailable(error: BaseException) -> bool:
    if isinstance(error, sqlite3.OperationalError):
        return (getattr(error, "sqlite_errorname", "") or "").startswith(_SQLITE_UNAVAILABLE)
    # psycopg's OperationalError: refused, terminated or closed connections, a database not
    # accepting connections, a statement cancelled by the server; but a deadlock or a
    # serialization failure is a conflict between transactions, not an unreachable database.
    return isinstance(error, psycopg.OperationalError) and not isinstance(error, psycopg.errors.TransactionRollback)


def _raise_unavailable_or_reraise(error: Exception) -> NoReturn:
    wrapped = store_error(error)
    if wrapped is None or wrapped is error:
        raise error
    raise wrapped from error


@contextmanager
def _cursor(connection: Connection) -> Iterator[Any]:
    """The connection's driver cursor, closed after use; an unreachable database or a refused
    value leaves as the store's own error."""
    try:
        cursor = connection.connection.cursor()
        try:
            yield cursor
        finally:
            cursor.close()
    except Exception as error:
        _raise_unavailable_or_reraise(error)


@overload
def fetch_one(connection: Connection, statement: str, params: Params = ...) -> tuple[Any, ...] | None: ...
@overload
def fetch_one(connection: Connection, statement: str, params: Params, row: type[R]) -> R | None: ...
def fetch_one(connection: Connection, statement: str, params: Params = (), row: type[Any] | None = None) -> Any:
    """The first row of ``statement`` (as ``row`` when given), or None."""
    with _cursor(connection) as cursor:
        cursor.execute(statement, params)
        raw = cursor.fetchone()
    return raw if row is None or raw is None else row._make(raw)


def fetch_value(connection: Connection, statement: str, params: Params = ()) -> Any:
    """The first column of the first row, or None when there is no row."""
    raw = fetch_one(connection, statement, params)
    return None if raw is None else raw[0]


@overload
def fetch_all(connection: Connection, statement: str, params: Params = ...) -> list[tuple[Any, ...]]: ...
@overload
def fetch_all(connection: Connection, statement: str, params: Params, row: type[R]) -> list[R]: ...
def fetch_all(connection: Connection, statement: str, params: Params = (), row: type[Any] | None = None) -> list[Any]:
    """Every row of ``statement`` (each as ``row`` when given)."""
    with _cursor(connection) as cursor:
        cursor.execute(statement, params)
        raws = cursor.fetchall()
    return raws if row is None else list(map(row._make, raws))


def execute(connection: Connection, statement: str, params: Params = ()) -> None:
    """Run a statement that returns no rows."""
    with _cursor(connection) as cursor:
        cursor.execute(statement, params)


def execute_many(connection: Connection, statement: str, rows: Sequence[Params]) -> None:
    """Run a statement once per row of parameters, in one driver call."""
    with _cursor(connection) as cursor:
        cursor.executemany(statement, rows)


def execute_chunks(connection: Connection, statement: str, values: Sequence[Any], size: int = 500) -> None:
    """Run ``statement``, whose ``{}`` takes a list of placeholders, over ``values`` in chunks of ``size``
    (``WHERE x IN ({})``): a database limits the parameters of one statement."""
    mark = "?" if connection.dialect.name == "sqlite" else "%s"
    for start in range(0, len(values), size):
        chunk = values[start:start + size]
        execute(connection, statement.format(", ".join([mark] * len(chunk))), chunk)
