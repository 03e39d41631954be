"""recipes: recipe definitions and their runs

Revision ID: 0008
Revises: 0007
Create Date: 2026-12-06 20:40:00.000000
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0008'
down_revision: str | None = '0007'
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('recipes',
    sa.Column('recipe_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('public', sa.Boolean(), nullable=False),
    sa.Column('revision', sa.Integer(), nullable=False),
    sa.Column('retired', sa.Boolean(), nullable=False),
    sa.Column('step_count', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('recipe_id')
    )
    with op.batch_alter_table('recipes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_recipes_name'), ['name'], unique=False)
        batch_op.create_index(batch_op.f('ix_recipes_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_recipes_public'), ['public'], unique=False)

    op.create_table('recipe_runs',
    sa.Column('run_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('recipe_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('recipe_name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('recipe_revision', sa.Integer(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('current_step', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('waiting_on', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('steps_done', sa.Integer(), nullable=False),
    sa.Column('step_count', sa.Integer(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('run_id')
    )
    with op.batch_alter_table('recipe_runs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_recipe_runs_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_recipe_runs_recipe_id'), ['recipe_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_recipe_runs_status'), ['status'], unique=False)


def downgrade() -> None:
    with op.batch_alter_table('recipe_runs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_recipe_runs_status'))
        batch_op.drop_index(batch_op.f('ix_recipe_runs_recipe_id'))
        batch_op.drop_index(batch_op.f('ix_recipe_runs_owner'))
    op.drop_table('recipe_runs')
    with op.batch_alter_table('recipes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_recipes_public'))
        batch_op.drop_index(batch_op.f('ix_recipes_owner'))
        batch_op.drop_index(batch_op.f('ix_recipes_name'))
    op.drop_table('recipes')
