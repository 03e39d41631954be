"""API keys: stored as SHA-256 hashes, looked up by a public id, revocable.

A key reads ``gsk_<key id>_<secret>``. Only its hash is kept, so a leaked
database does not leak working keys; the id lets a lookup hit one row.

Every keyless request asks whether any key is active (no key: the server runs
open). A process trusts its answer for ``OPEN_MODE_RECHECK_SECONDS``; the query
cost as much as the rest of a GET's own database work. Creating the first key
therefore waits that long before it returns, so that once ``keys create`` has
printed a key, no running server still serves keyless requests. Presented keys
are looked up on every request: a revocation counts from the next request on.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from datetime import UTC, datetime

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlmodel import Field, SQLModel

from genome_service.eventstore.database import Database
from genome_service.eventstore.driver import fetch_one
from genome_service.projections.columns import utc

PREFIX = "gsk"
OPEN_MODE_RECHECK_SECONDS = 0.5


class ApiKeyRow(SQLModel, table=True):
    __tablename__ = "api_keys"

    key_id: str = Field(primary_key=True, max_length=32)
    owner: str = Field(index=True, max_length=200)
    key_hash: str = Field(max_length=64)
    created_at: datetime = Field(sa_column=sa.Column(sa.DateTime(timezone=True), nullable=False))
    revoked_at: datetime | None = Field(default=None, sa_column=sa.Column(sa.DateTime(timezone=True), nullable=True))


class ApiKey(msgspec.Struct, frozen=True):
    key_id: str
    owner: str
    created_at: datetime
    revoked_at: datetime | None


class IssuedKey(msgspec.Struct, frozen=True):
    key_id: str
    owner: str
    secret: str  # shown once, never stored


_table = SQLModel.metadata.tables["api_keys"]


def _hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class KeyStore:
    """Every request asks one of two questions here, so both are plain driver SQL."""

    def __init__(self, database: Database) -> None:
        self.database = database
        self._select_owner = database.sql("SELECT owner, key_hash FROM api_keys WHERE key_id = ? AND revoked_at IS NULL")
        self._any_active = False
        self._checked_at = -math.inf

    def create(self, owner: str) -> IssuedKey:
        """A new key for ``owner``; the first active one returns only once open servers have closed."""
        owner = owner.strip()
        if not owner or len(owner) > 200:
            raise ValueError("an API key needs an owner name of 1 to 200 characters")
        key_id = secrets.token_hex(6)
        secret = f"{PREFIX}_{key_id}_{secrets.token_urlsafe(32)}"
        with self.database.write() as connection:
            # Inside the write transaction: no other key can appear between this read and the insert.
            first = connection.execute(sa.select(_table.c.key_id).where(_table.c.revoked_at.is_(None)).limit(1)).first() is None
            connection.execute(
                sa.insert(_table).values(key_id=key_id, owner=owner, key_hash=_hash(secret), created_at=datetime.now(UTC))
            )
        self._checked_at = -math.inf
        if first:
            time.sleep(OPEN_MODE_RECHECK_SECONDS)
        return IssuedKey(key_id, owner, secret)

    def revoke(self, key_id: str) -> bool:
        with self.database.write() as connection:
            result = connection.execute(
                sa.update(_table)
                .where(_table.c.key_id == key_id, _table.c.revoked_at.is_(None))
                .values(revoked_at=datetime.now(UTC))
            )
        self._checked_at = -math.inf
        return result.rowcount == 1

    def list(self) -> list[ApiKey]:
        with self.database.read() as connection:
            rows = connection.execute(sa.select(_table).order_by(_table.c.created_at)).mappings()
            return [
                ApiKey(r["key_id"], r["owner"], utc(r["created_at"]), r["revoked_at"] and utc(r["revoked_at"]))
                for r in rows
            ]

    def any_active(self) -> bool:
        """Whether any key is active, as of at most ``OPEN_MODE_RECHECK_SECONDS`` ago."""
        # The time is taken before the query, so the answer is never older than it claims.
        now = time.monotonic()
        if now - self._checked_at >= OPEN_MODE_RECHECK_SECONDS:
            self._any_active, self._checked_at = self._query_any_active(), now
        return self._any_active

    def _query_any_active(self) -> bool:
        with self.database.read() as connection:
            return fetch_one(connection, "SELECT 1 FROM api_keys WHERE revoked_at IS NULL LIMIT 1") is not None

    def _active_key(self, connection: Connection, key_id: str) -> tuple[str, str] | None:
        row = fetch_one(connection, self._select_owner, (key_id,))
        return None if row is None else (row[0], row[1])

    def owner_of(self, presented: str) -> str | None:
        """The owner of an active key, or None for anything else."""
        parts = presented.split("_")
        if len(parts) < 3 or parts[0] != PREFIX:
            return None
        # Cached until the next commit anywhere (SQLite), so a revocation still counts at once.
        row = self.database.read_through(("api_keys", parts[1]), lambda connection: self._active_key(connection, parts[1]))
        if row is None or not hmac.compare_digest(row[1], _hash(presented)):
            return None
        return row[0]
