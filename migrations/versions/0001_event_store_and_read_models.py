"""event store and read models

Revision ID: 0001
Revises:
Create Date: 2026-11-24 10:02:13.328253

The events table is append-only in the database itself: triggers refuse UPDATE
and DELETE (and TRUNCATE on PostgreSQL) whoever connects.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
import sqlmodel
from alembic import op

revision: str = '0001'
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table('academy_sessions',
    sa.Column('session_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('persona_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('goal', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('target_similarity', sa.Float(), nullable=False),
    sa.Column('budget_steps', sa.Integer(), nullable=False),
    sa.Column('budget_seconds', sa.Float(), nullable=False),
    sa.Column('status', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('session_id')
    )
    with op.batch_alter_table('academy_sessions', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_academy_sessions_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_academy_sessions_persona_id'), ['persona_id'], unique=False)
        batch_op.create_index(batch_op.f('ix_academy_sessions_status'), ['status'], unique=False)

    op.create_table('events',
    sa.Column('position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), autoincrement=False, nullable=False),
    sa.Column('stream_id', sa.String(length=64), nullable=False),
    sa.Column('stream_type', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('type', sa.String(length=128), nullable=False),
    sa.Column('schema_version', sa.SmallInteger(), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('metadata', sa.Text(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('position'),
    sa.UniqueConstraint('stream_id', 'version', name='uq_events_stream_version')
    )
    op.create_table('genome_layer_refs',
    sa.Column('genome_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('position', sa.Integer(), nullable=False),
    sa.Column('layer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('weight', sa.Float(), nullable=False),
    sa.PrimaryKeyConstraint('genome_id', 'position')
    )
    with op.batch_alter_table('genome_layer_refs', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_genome_layer_refs_layer_id'), ['layer_id'], unique=False)

    op.create_table('genomes',
    sa.Column('genome_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('persona_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('base_model', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('parent_ids', sa.JSON(), nullable=False),
    sa.Column('generation', sa.Integer(), nullable=False),
    sa.Column('archived', sa.Boolean(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('genome_id')
    )
    with op.batch_alter_table('genomes', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_genomes_base_model'), ['base_model'], unique=False)
        batch_op.create_index(batch_op.f('ix_genomes_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_genomes_persona_id'), ['persona_id'], unique=False)

    op.create_table('idempotency_keys',
    sa.Column('key', sa.String(length=200), nullable=False),
    sa.Column('stream_id', sa.String(length=64), nullable=False),
    sa.Column('first_position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.Column('last_position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.PrimaryKeyConstraint('key')
    )
    op.create_table('layers',
    sa.Column('layer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('base_model', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('adapter_sha256', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('adapter_format', sqlmodel.sql.sqltypes.AutoString(length=16), nullable=False),
    sa.Column('rank', sa.Integer(), nullable=False),
    sa.Column('target_modules', sa.JSON(), nullable=False),
    sa.Column('trait_type', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('tags', sa.JSON(), nullable=False),
    sa.Column('creator', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('license', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('public', sa.Boolean(), nullable=False),
    sa.Column('parent_layer_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('training_metrics', sa.JSON(), nullable=True),
    sa.Column('deprecated', sa.Boolean(), nullable=False),
    sa.Column('deprecation_reason', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('layer_id')
    )
    with op.batch_alter_table('layers', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_layers_base_model'), ['base_model'], unique=False)
        batch_op.create_index(batch_op.f('ix_layers_creator'), ['creator'], unique=False)
        batch_op.create_index(batch_op.f('ix_layers_owner'), ['owner'], unique=False)
        batch_op.create_index(batch_op.f('ix_layers_public'), ['public'], unique=False)
        batch_op.create_index(batch_op.f('ix_layers_trait_type'), ['trait_type'], unique=False)

    op.create_table('personas',
    sa.Column('persona_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('owner', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=200), nullable=False),
    sa.Column('description', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('system_prompt', sqlmodel.sql.sqltypes.AutoString(), nullable=False),
    sa.Column('genome_id', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=True),
    sa.Column('archived', sa.Boolean(), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('created_at', sa.DateTime(timezone=True), nullable=False),
    sa.Column('updated_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('persona_id')
    )
    with op.batch_alter_table('personas', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_personas_owner'), ['owner'], unique=False)

    op.create_table('projection_checkpoints',
    sa.Column('name', sqlmodel.sql.sqltypes.AutoString(length=64), nullable=False),
    sa.Column('position', sa.BigInteger().with_variant(sa.Integer(), 'sqlite'), nullable=False),
    sa.PrimaryKeyConstraint('name')
    )
    op.create_table('snapshots',
    sa.Column('stream_id', sa.String(length=64), nullable=False),
    sa.Column('stream_type', sa.String(length=64), nullable=False),
    sa.Column('version', sa.Integer(), nullable=False),
    sa.Column('state_schema', sa.String(length=32), nullable=False),
    sa.Column('data', sa.Text(), nullable=False),
    sa.Column('recorded_at', sa.DateTime(timezone=True), nullable=False),
    sa.PrimaryKeyConstraint('stream_id')
    )
    _refuse_changes_to_events()


def downgrade() -> None:
    _allow_changes_to_events()
    op.drop_table('snapshots')
    op.drop_table('projection_checkpoints')
    with op.batch_alter_table('personas', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_personas_owner'))

    op.drop_table('personas')
    with op.batch_alter_table('layers', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_layers_trait_type'))
        batch_op.drop_index(batch_op.f('ix_layers_public'))
        batch_op.drop_index(batch_op.f('ix_layers_owner'))
        batch_op.drop_index(batch_op.f('ix_layers_creator'))
        batch_op.drop_index(batch_op.f('ix_layers_base_model'))

    op.drop_table('layers')
    op.drop_table('idempotency_keys')
    with op.batch_alter_table('genomes', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_genomes_persona_id'))
        batch_op.drop_index(batch_op.f('ix_genomes_owner'))
        batch_op.drop_index(batch_op.f('ix_genomes_base_model'))

    op.drop_table('genomes')
    with op.batch_alter_table('genome_layer_refs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_genome_layer_refs_layer_id'))

    op.drop_table('genome_layer_refs')
    op.drop_table('events')
    with op.batch_alter_table('academy_sessions', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_academy_sessions_status'))
        batch_op.drop_index(batch_op.f('ix_academy_sessions_persona_id'))
        batch_op.drop_index(batch_op.f('ix_academy_sessions_owner'))

    op.drop_table('academy_sessions')


def _refuse_changes_to_events() -> None:
    if op.get_bind().dialect.name == "sqlite":
        for action in ("UPDATE", "DELETE"):
            op.execute(
                f"CREATE TRIGGER events_refuse_{action.lower()} BEFORE {action} ON events "
                f"BEGIN SELECT RAISE(ABORT, 'events are append-only: {action} is refused'); END"
            )
        return
    op.execute(
        "CREATE FUNCTION events_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$ "
        "BEGIN RAISE EXCEPTION 'events are append-only: % is refused', TG_OP; END $$"
    )
    op.execute(
        "CREATE TRIGGER events_refuse_update_delete BEFORE UPDATE OR DELETE ON events "
        "FOR EACH ROW EXECUTE FUNCTION events_refuse_change()"
    )
    op.execute(
        "CREATE TRIGGER events_refuse_truncate BEFORE TRUNCATE ON events "
        "FOR EACH STATEMENT EXECUTE FUNCTION events_refuse_change()"
    )


def _allow_changes_to_events() -> None:
    if op.get_bind().dialect.name == "sqlite":
        op.execute("DROP TRIGGER events_refuse_update")
        op.execute("DROP TRIGGER events_refuse_delete")
        return
    op.execute("DROP TRIGGER events_refuse_truncate ON events")
    op.execute("DROP TRIGGER events_refuse_update_delete ON events")
    op.execute("DROP FUNCTION events_refuse_change()")
