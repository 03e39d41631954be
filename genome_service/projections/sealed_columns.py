"""Personal text in read-model columns, sealed with the subject's data key.

Read models are rebuilt from the log and must come out byte for byte the same, so
their values are sealed deterministically (AES-SIV), bound to (table, row key,
column). A stored value starts with ``sealed:``; a row written before sealing
existed holds its text as it is, and reads back as such until the next rebuild.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from genome_service.eventstore.cipher import DataKey, associated

PREFIX = "sealed:"
Row = dict[str, Any]


def _context(table: sa.Table, row: Row, column: str) -> bytes:
    return associated(table.name, *(str(row[c.name]) for c in table.primary_key.columns), column)


def seal_rows(key: DataKey, table: sa.Table, rows: Sequence[Row], columns: Sequence[str]) -> list[Row]:
    return [row | {c: PREFIX + key.seal_fixed(row[c], _context(table, row, c)) for c in columns} for row in rows]


def open_value(key: DataKey | None, table: sa.Table, row: Row, column: str) -> str | None:
    """The column's text; None when it was sealed with a key since shredded."""
    value: str = row[column]
    if not value.startswith(PREFIX):
        return value
    if key is None:
        return None
    return key.open_fixed(value[len(PREFIX):], _context(table, row, column))
