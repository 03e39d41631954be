"""academy sessions: plan, challenge, example and training progress columns

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-24 13:10:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = '0005'
down_revision: str | None = '0004'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Server defaults fill rows that exist already; `projections rebuild` writes the real values.
    with op.batch_alter_table('academy_sessions', schema=None) as batch_op:
        batch_op.add_column(sa.Column('planned', sa.Boolean(), nullable=False, server_default=sa.false()))
        batch_op.add_column(sa.Column('challenge_count', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('example_count', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('step', sa.Integer(), nullable=False, server_default='0'))
        batch_op.add_column(sa.Column('loss', sa.Float(), nullable=True))
        batch_op.add_column(sa.Column('layer_ids', sa.JSON(), nullable=False, server_default='[]'))


def downgrade() -> None:
    with op.batch_alter_table('academy_sessions', schema=None) as batch_op:
        for column in ('layer_ids', 'loss', 'step', 'example_count', 'challenge_count', 'planned'):
            batch_op.drop_column(column)
