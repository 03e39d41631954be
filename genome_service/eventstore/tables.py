"""Tables the event store owns. Alembic creates them; nothing calls ``create_all``."""

from __future__ import annotations

import sqlalchemy as sa
from sqlmodel import SQLModel

# On SQLite only ``INTEGER PRIMARY KEY`` aliases the rowid (the B-tree key itself).
Position = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

events = sa.Table(
    "events",
    SQLModel.metadata,
    sa.Column("position", Position, primary_key=True, autoincrement=False),
    sa.Column("stream_id", sa.String(64), nullable=False),
    sa.Column("stream_type", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    sa.Column("type", sa.String(128), nullable=False),
    sa.Column("schema_version", sa.SmallInteger(), nullable=False),
    sa.Column("data", sa.Text(), nullable=False),
    sa.Column("metadata", sa.Text(), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
    # The optimistic-concurrency guard, and the index every stream read uses.
    sa.UniqueConstraint("stream_id", "version", name="uq_events_stream_version"),
)

snapshots = sa.Table(
    "snapshots",
    SQLModel.metadata,
    sa.Column("stream_id", sa.String(64), primary_key=True),
    sa.Column("stream_type", sa.String(64), nullable=False),
    sa.Column("version", sa.Integer(), nullable=False),
    # Fingerprint of the state's schema: a snapshot of another shape is ignored.
    sa.Column("state_schema", sa.String(32), nullable=False),
    sa.Column("data", sa.Text(), nullable=False),
    sa.Column("recorded_at", sa.DateTime(timezone=True), nullable=False),
)

idempotency_keys = sa.Table(
    "idempotency_keys",
    SQLModel.metadata,
    sa.Column("key", sa.String(200), primary_key=True),
    sa.Column("stream_id", sa.String(64), nullable=False),
    sa.Column("first_position", Position, nullable=False),
    sa.Column("last_position", Position, nullable=False),
)
