"""Each subject's data key, wrapped, in a table of its own: the one mutable home of personal-data secrets.

The ``events`` table stays append-only; shredding a subject's key here makes every
value sealed with it unreadable wherever it lies (crypto-shredding). A shredded
subject keeps its row, without key, so nothing can mint it a new one afterwards.

Keys are looked up in the caller's transaction on every read that needs them and
never cached by subject alone: a key shredded by any process is unusable at once
in all of them. What is cached is only the costly part, unwrapping, by the wrapped
bytes themselves.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import SQLModel

from genome_service.eventstore.cipher import DataKey, MasterKey
from genome_service.eventstore.database import Database
from genome_service.eventstore.driver import execute, fetch_all
from genome_service.eventstore.errors import EventStoreError

personal_data_keys = sa.Table(
    "personal_data_keys",
    SQLModel.metadata,
    sa.Column("subject_id", sa.String(64), primary_key=True),
    # NULL once shredded.
    sa.Column("wrapped_key", sa.LargeBinary(), nullable=True),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("shredded_at", sa.DateTime(timezone=True), nullable=True),
)


class KeyRow(NamedTuple):
    """A subject's row of ``personal_data_keys``: its wrapped key, None once shredded."""

    subject_id: str
    wrapped_key: bytes | None


class SubjectErased(EventStoreError):
    """Personal data cannot be written for a subject whose key was shredded."""

    def __init__(self, subject_id: str) -> None:
        super().__init__(f"the personal data of {subject_id} was erased; nothing more can be recorded for it")
        self.subject_id = subject_id


class DataKeys:
    def __init__(self, database: Database, master_key_file: Path) -> None:
        self.database = database
        self.master_key_file = master_key_file
        self._master: MasterKey | None = None
        sql = database.sql
        self._select = "SELECT subject_id, wrapped_key FROM personal_data_keys WHERE subject_id IN ({})"
        self._insert = sql("INSERT INTO personal_data_keys (subject_id, wrapped_key, created_at) VALUES (?, ?, ?)")
        self._delete = sql("DELETE FROM personal_data_keys WHERE subject_id = ?")
        self._tombstone = sql("INSERT INTO personal_data_keys (subject_id, created_at, shredded_at) VALUES (?, ?, ?)")
        self._open = lru_cache(maxsize=4096)(self._unwrap)

    def for_reading(self, connection: Connection, subject_ids: Iterable[str]) -> dict[str, DataKey | None]:
        """Each subject's key, or None where it was shredded (or never made: nothing was sealed)."""
        wanted = sorted(set(subject_ids))
        found = {subject: None for subject in wanted} | {
            row.subject_id: row.wrapped_key for row in self._rows(connection, wanted) if row.wrapped_key is not None
        }
        return {subject: None if wrapped is None else self._open(subject, bytes(wrapped)) for subject, wrapped in found.items()}

    def for_writing(self, connection: Connection, subject_id: str) -> DataKey:
        """The subject's key, made on first use (inside the caller's write transaction)."""
        rows = self._rows(connection, [subject_id])
        if rows:
            if rows[0].wrapped_key is None:
                raise SubjectErased(subject_id)
            return self._open(subject_id, bytes(rows[0].wrapped_key))
        wrapped = self.master().wrap(DataKey.generate(), subject_id)
        execute(connection, self._insert, (subject_id, wrapped, self._now()))
        return self._open(subject_id, wrapped)

    def shred(self, connection: Connection, subject_id: str) -> None:
        """Forget the subject's key for good and leave a keyless row, so none is ever made again.

        A DELETE, not an UPDATE in place: with SQLite's secure_delete the freed cell is zeroed."""
        execute(connection, self._delete, (subject_id,))
        execute(connection, self._tombstone, (subject_id, self._now(), self._now()))
        self._open.cache_clear()

    def master(self) -> MasterKey:
        """Read (or on first use create) the master key file only when a key is needed."""
        if self._master is None:
            self._master = MasterKey.from_file(self.master_key_file)
        return self._master

    def _unwrap(self, subject_id: str, wrapped: bytes) -> DataKey:
        return DataKey(self.master().unwrap(wrapped, subject_id))

    def _rows(self, connection: Connection, subject_ids: list[str]) -> list[KeyRow]:
        if not subject_ids:
            return []
        statement = self.database.sql(self._select.format(", ".join("?" * len(subject_ids))))
        return fetch_all(connection, statement, tuple(subject_ids), KeyRow)

    def _now(self) -> object:
        return self.database.to_db_time(datetime.now(UTC))
