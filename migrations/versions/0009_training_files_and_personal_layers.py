"""training files (the fine-tuning API's uploads) and layers that carry a persona's data

Revision ID: 0009
Revises: 0008
Create Date: 2026-12-07 02:30:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0009'
down_revision: str | None = '0008'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('training_files',
    sa.Column('file_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('filename', sqlmodel.sql.sqltypes.AutoString(length=255), nullable=False),
    sa.Column('purpose', sqlmodel.sql.sqltypes.AutoString(length=32), nullable=False),
    sa.Column('bytes', sa.Integer(), nullable=False),
    sa.Column('sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('examples', sa.Integer(), nullable=False),
    sa.Column('deleted', sa.Boolean(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('file_id')
    )
    with op.batch_alter_table('training_files', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_training_files_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_training_files_deleted'), ['deleted'], unique=False)
    # Server defaults fill rows that exist already: no layer carried a persona's data before.
    with op.batch_alter_table('layers', schema=None) as batch_op:
        batch_op.add_column(sa.Column('personal_of', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True))
        batch_op.add_column(sa.Column('erased', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.create_index(batch_op.f('ix_layers_personal_of'), ['personal_of'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('layers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_layers_personal_of'))
        batch_op.drop_column('erased')
        batch_op.drop_column('personal_of')
    with op.batch_alter_table('training_files', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_training_files_deleted'))
        batch_op.drop_index(batch_op.f('ix_training_files_owner'))
    op.drop_table('training_files')
