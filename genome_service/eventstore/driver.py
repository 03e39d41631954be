"""Statements on the driver's own cursor.

The hot paths (a GET by id, an append) run their statements here rather than through
SQLAlchemy's execution machinery, which cost more than the indexed lookup itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, TypeVar, overload

from sqlalchemy.engine import Connection

R = TypeVar("R", bound=tuple[Any, ...])
Params = Sequence[Any]


@overload
def fetch_one(connection: Connection, statement: str, params: Params = ...) -> tuple[Any, ...] | None: ...
@overload
def fetch_one(connection: Connection, statement: str, params: Params, row: type[R]) -> R | None: ...
def fetch_one(connection: Connection, statement: str, params: Params = (), row: type[Any] | None = None) -> Any:
    """The first row of ``statement`` (as ``row`` when given), or None."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(statement, params)
        raw = cursor.fetchone()
    finally:
        cursor.close()
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
    cursor = connection.connection.cursor()
    try:
        cursor.execute(statement, params)
        raws = cursor.fetchall()
    finally:
        cursor.close()
    return raws if row is None else list(map(row._make, raws))


def execute(connection: Connection, statement: str, params: Params = ()) -> None:
    """Run a statement that returns no rows."""
    cursor = connection.connection.cursor()
    try:
        cursor.execute(statement, params)
    finally:
        cursor.close()


def execute_many(connection: Connection, statement: str, rows: Sequence[Params]) -> None:
    """Run a statement once per row of parameters, in one driver call."""
    cursor = connection.connection.cursor()
    try:
        cursor.executemany(statement, rows)
    finally:
        cursor.close()


def execute_chunks(connection: Connection, statement: str, values: Sequence[Any], size: int = 500) -> None:
    """Run ``statement``, whose ``{}`` takes a list of placeholders, over ``values`` in chunks of ``size``
    (``WHERE x IN ({})``): a database limits the parameters of one statement."""
    mark = "?" if connection.dialect.name == "sqlite" else "%s"
    for start in range(0, len(values), size):
        chunk = values[start:start + size]
        execute(connection, statement.format(", ".join([mark] * len(chunk))), chunk)
