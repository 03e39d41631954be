"""Alembic environment: the one way tables are created.

The URL comes from ``sqlalchemy.url`` when a caller set it (tests, the CLI),
else from the service settings (``GENOME_DATABASE_URL`` or the embedded SQLite).
"""

from __future__ import annotations

from alembic import context
from sqlalchemy import engine_from_config, pool
from sqlmodel import SQLModel

import genome_service.eventstore.data_keys  # noqa: F401  (registers the tables)
import genome_service.eventstore.tables  # noqa: F401
import genome_service.projections.tables  # noqa: F401
import genome_service.services.keys  # noqa: F401
from genome_service.eventstore.database import normalise_url
from genome_service.settings import Settings

config = context.config
target_metadata = SQLModel.metadata


def _url() -> str:
    url = config.get_main_option("sqlalchemy.url")
    if url:
        return normalise_url(url)
    settings = Settings.from_env()
    if not settings.database_url:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
    return normalise_url(settings.resolved_database_url)


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=target_metadata, literal_binds=True, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    engine = engine_from_config({"sqlalchemy.url": _url()}, prefix="sqlalchemy.", poolclass=pool.NullPool)
    with engine.connect() as connection:
        _run(connection)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # SQLite cannot ALTER most things in place; batch mode rebuilds tables instead.
    context.configure(connection=connection, target_metadata=target_metadata, render_as_batch=True)
    with context.begin_transaction():
        context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
