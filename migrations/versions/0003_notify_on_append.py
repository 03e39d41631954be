"""notify listeners of appends from the database

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-24 10:25:00

On PostgreSQL a statement-level trigger sends NOTIFY genome_events for every
INSERT into events (delivered at commit), so an append needs no extra round
trip to wake catch-up subscribers. SQLite has no NOTIFY: subscribers poll.
"""

from __future__ import annotations

from collections.abc import Sequence

from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute(
        "CREATE FUNCTION events_notify() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN PERFORM pg_notify('genome_events', ''); RETURN NULL; END $$"
    )
    op.execute(
        "CREATE TRIGGER events_notify AFTER INSERT ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION events_notify()"
    )


def downgrade() -> None:
    if op.get_bind().dialect.name != "postgresql":
        return
    op.execute("DROP TRIGGER events_notify ON events")
    op.execute("DROP FUNCTION events_notify()")
