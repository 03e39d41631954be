"""The read side: rows of the read models, by id or as keyset-paginated lists."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from functools import cache
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from genome_service.eventstore.driver import fetch_all, fetch_one
from genome_service.projections.columns import decoder

Row = dict[str, Any]


def get_row(connection: Connection, table: sa.Table, key: str, value: str) -> Row | None:
    """One row by its key, read on the driver: the hot path of every GET by id."""
    reader = _reader(table, key, connection.dialect.name)
    raw = fetch_one(connection, reader.statement, (value,))
    if raw is None:
        return None
    return {name: decode(v) for name, decode, v in zip(reader.names, reader.decoders, raw, strict=True)}


def get_row_with_children(
    connection: Connection, table: sa.Table, key: str, value: str, children: sa.Table, order_by: str,
) -> tuple[Row, list[Row]] | None:
    """One row by its key and its child rows (a genome and its stack) in one statement: a GET's
    second round trip cost as much as its first. The children's table names the parent by ``key`` too."""
    reader = _family_reader(table, key, children, order_by, connection.dialect.name)
    raws = fetch_all(connection, reader.statement, (value,))
    if not raws:
        return None
    width = len(reader.names)
    first = raws[0]
    row = {name: decode(v) for name, decode, v in zip(reader.names, reader.decoders, first[:width], strict=True)}
    # A LEFT JOIN gives a parent without children one row whose child columns are all NULL.
    if first[width] is None:
        return row, []
    return row, [dict(zip(reader.child_names, raw[width:], strict=True)) for raw in raws]


def child_rows(connection: Connection, table: sa.Table, parent_key: str, parent_ids: Sequence[str], order_by: str) -> list[Row]:
    """Rows owned by some parents (a genome's stack), on the driver, in parent then ``order_by`` order."""
    if not parent_ids:
        return []
    mark = "?" if connection.dialect.name == "sqlite" else "%s"
    names = [c.name for c in table.columns]
    statement = (
        f"SELECT {', '.join(names)} FROM {table.name} WHERE {parent_key} IN ({', '.join([mark] * len(parent_ids))}) "
        f"ORDER BY {parent_key}, {order_by}"
    )
    return [dict(zip(names, raw, strict=True)) for raw in fetch_all(connection, statement, tuple(parent_ids))]


class _Reader:
    def __init__(self, table: sa.Table, key: str, dialect: str) -> None:
        self.names = [c.name for c in table.columns]
        mark = "?" if dialect == "sqlite" else "%s"
        self.statement = f"SELECT {', '.join(self.names)} FROM {table.name} WHERE {key} = {mark}"
        self.decoders = [decoder(c.type, dialect) for c in table.columns]


@cache
def _reader(table: sa.Table, key: str, dialect: str) -> _Reader:
    return _Reader(table, key, dialect)


class _FamilyReader:
    def __init__(self, table: sa.Table, key: str, children: sa.Table, order_by: str, dialect: str) -> None:
        self.names = [c.name for c in table.columns]
        self.decoders = [decoder(c.type, dialect) for c in table.columns]
        # The child's own primary key column first: it is NULL only when there is no child.
        self.child_names = [order_by, *(c.name for c in children.columns if c.name != order_by)]
        mark = "?" if dialect == "sqlite" else "%s"
        columns = [f"p.{n}" for n in self.names] + [f"c.{n}" for n in self.child_names]
        self.statement = (
            f"SELECT {', '.join(columns)} FROM {table.name} p LEFT JOIN {children.name} c ON c.{key} = p.{key} "
            f"WHERE p.{key} = {mark} ORDER BY c.{order_by}"
        )


@cache
def _family_reader(table: sa.Table, key: str, children: sa.Table, order_by: str, dialect: str) -> _FamilyReader:
    return _FamilyReader(table, key, children, order_by, dialect)


def list_rows(
    connection: Connection,
    table: sa.Table,
    key: str,
    where: Sequence[sa.ColumnElement[bool]],
    *,
    after: tuple[datetime, str] | None,
    limit: int,
) -> tuple[list[Row], bool]:
    """Up to ``limit`` rows in (created_at, id) order after a cursor; and whether more follow."""
    statement = sa.select(table).where(*where)
    if after is not None:
        created_at, last_id = after
        statement = statement.where(sa.tuple_(table.c.created_at, table.c[key]) > sa.tuple_(sa.literal(created_at, sa.DateTime(timezone=True)), sa.literal(last_id)))
    statement = statement.order_by(table.c.created_at, table.c[key]).limit(limit + 1)
    rows = [dict(r) for r in connection.execute(statement).mappings()]
    return rows[:limit], len(rows) > limit
