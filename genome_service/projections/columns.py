"""How read-model values cross the driver: one encoder and one decoder per column type.

Read models are written and read on the driver (SQLAlchemy's per-row type
processing costs more than the database does), so these replace what its
column types would do: JSON as text, SQLite times as SQLAlchemy's naive-UTC text.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
import sqlalchemy as sa

# SQLAlchemy's SQLite DateTime text format, so ORM reads of these tables parse it.
_SQLITE_TIME = "%Y-%m-%d %H:%M:%S.%f"
_json = msgspec.json.Encoder()

Codec = Callable[[Any], Any]


def encoder(column_type: sa.types.TypeEngine[Any], dialect: str) -> Codec:
    if isinstance(column_type, sa.JSON):
        return _json_to_text
    if isinstance(column_type, sa.DateTime) and dialect == "sqlite":
        return _time_to_sqlite
    return _same


def decoder(column_type: sa.types.TypeEngine[Any], dialect: str) -> Codec:
    if isinstance(column_type, sa.JSON):
        # psycopg already parses json columns; SQLite hands back the text.
        return _json_from_text if dialect == "sqlite" else _same
    if isinstance(column_type, sa.DateTime):
        return _time_from_sqlite if dialect == "sqlite" else utc
    if isinstance(column_type, sa.Boolean):
        return _bool_or_none
    return _same


def utc(moment: datetime) -> datetime:
    """SQLite hands back naive datetimes; every stored time is UTC."""
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def _json_to_text(value: Any) -> str | None:
    return None if value is None else _json.encode(value).decode()


def _json_from_text(value: Any) -> Any:
    return None if value is None else msgspec.json.decode(value)


def _time_to_sqlite(value: datetime) -> str:
    return value.astimezone(UTC).strftime(_SQLITE_TIME)


def _time_from_sqlite(value: Any) -> datetime | None:
    return None if value is None else datetime.fromisoformat(value).replace(tzinfo=UTC)


def _bool_or_none(value: Any) -> bool | None:
    return None if value is None else bool(value)


def _same(value: Any) -> Any:
    return value
