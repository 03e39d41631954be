"""The read side: rows of the read models, by id or as keyset-paginated lists."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

Row = dict[str, Any]


def utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def get_row(connection: Connection, table: sa.Table, key: str, value: str) -> Row | None:
    row = connection.execute(sa.select(table).where(table.c[key] == value)).mappings().first()
    return dict(row) if row is not None else None


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
