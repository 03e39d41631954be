"""personal data keys: per-persona data keys for sealing knowledge and messages (crypto-shredding)

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-25 09:00:00.000000

The keys get a table of their own, the one place a persona's secret can be
destroyed: ``events`` stays append-only. Sealed knowledge titles no longer fit 200
characters. Snapshots of knowledge and conversation streams held their text in
clear; such streams are no longer snapshotted, so the old snapshots go.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0007'
down_revision: str | None = '0006'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('personal_data_keys',
    sa.Column('subject_id', sa.String(length=64), nullable=False),
    sa.Column('wrapped_key', sa.LargeBinary(), nullable=True),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('shredded_at', sa.DateTime(timezone=True), nullable=True),
    sa.PrimaryKeyConstraint('subject_id')
    )
    with op.batch_alter_table('personas', schema=None) as batch_op:
        batch_op.add_column(sa.Column('erased', sa.Boolean(), server_default=sa.false(), nullable=False))
    with op.batch_alter_table('knowledge', schema=None) as batch_op:
        batch_op.alter_column('title', existing_type=sqlmodel.sql.sqltypes.AutoString(length=200),
                              type_=sqlmodel.sql.sqltypes.AutoString(), existing_nullable=False)
    op.execute("DELETE FROM snapshots WHERE stream_type IN ('knowledge', 'conversation')")


def downgrade() -> None:
    with op.batch_alter_table('knowledge', schema=None) as batch_op:
        batch_op.alter_column('title', existing_type=sqlmodel.sql.sqltypes.AutoString(),
                              type_=sqlmodel.sql.sqltypes.AutoString(length=200), existing_nullable=False)
    with op.batch_alter_table('personas', schema=None) as batch_op:
        batch_op.drop_column('erased')
    op.drop_table('personal_data_keys')
