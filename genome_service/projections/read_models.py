"""How each aggregate's state maps onto its read-model rows.

A read model is a pure function of the folded state, so projecting reuses the
domain's own ``evolve`` and no rule is written twice (once as a decision, once
as SQL). Columns holding a persona's personal text are stored sealed with its
data key; a stream whose personal data was erased keeps no rows at all.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import cache
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from genome_service.domain.academy import ACADEMY_SESSION
from genome_service.domain.common import Decider
from genome_service.domain.conversation import CONVERSATION
from genome_service.domain.genome import GENOME
from genome_service.domain.knowledge import KNOWLEDGE
from genome_service.domain.layer import LAYER
from genome_service.domain.persona import PERSONA
from genome_service.domain.recipe import RECIPE
from genome_service.domain.recipe_run import RECIPE_RUN
from genome_service.domain.training_file import TRAINING_FILE
from genome_service.eventstore.data_keys import DataKeys, SubjectErased
from genome_service.eventstore.driver import execute_chunks, execute_many
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.columns import encoder
from genome_service.projections.sealed_columns import seal_rows
from genome_service.projections.tables import (
    ACADEMY_SESSIONS,
    CONVERSATION_MESSAGES,
    CONVERSATIONS,
    GENOME_LAYER_REFS,
    GENOMES,
    KNOWLEDGE_CHUNKS,
    KNOWLEDGE_DOCUMENTS,
    LAYERS,
    PERSONAS,
    RECIPE_RUNS,
    RECIPES,
    TRAINING_FILES,
)

Row = dict[str, Any]


class ChildRows(msgspec.Struct, frozen=True):
    """Rows owned by one parent row, replaced whole whenever the parent changes."""

    table: sa.Table
    parent_key: str
    rows: Callable[[Aggregate[Any]], list[Row]]
    sealed: tuple[str, ...] = ()  # columns of personal text


class ReadModel(msgspec.Struct, frozen=True):
    decider: Decider[Any, Any, Any]
    table: sa.Table
    key: str
    to_row: Callable[[Any], Row]
    children: ChildRows | None = None
    # Columns of personal text, sealed with the key of the persona named in ``subject``.
    sealed: tuple[str, ...] = ()
    subject: str | None = None

    @property
    def tables(self) -> tuple[sa.Table, ...]:
        return (self.table,) if self.children is None else (self.table, self.children.table)

    def write(self, connection: Connection, aggregates: Sequence[Aggregate[Any]], *, fresh: bool = False,
              keys: DataKeys | None = None) -> None:
        """Upsert the aggregates' rows; ``fresh`` means the tables were just cleared (a rebuild).

        ``keys`` seal the personal columns; an aggregate whose subject's key is shredded
        (its events read back ``erased``, or were written in clear before sealing) loses its rows."""
        personal = self.subject is not None
        live = [a for a in aggregates if a.state is not None and not (personal and a.state.erased)]
        subject_keys: dict[str, Any] = {}  # stream id -> its subject's data key
        if self.subject is not None and keys is not None:
            by_subject: dict[str, Any] = {}
            for aggregate in live:
                subject = getattr(aggregate.state, self.subject)
                if subject not in by_subject:
                    try:
                        by_subject[subject] = keys.for_writing(connection, subject)
                    except SubjectErased:
                        by_subject[subject] = None
                subject_keys[aggregate.stream_id] = by_subject[subject]
            live = [a for a in live if subject_keys[a.stream_id] is not None]
        kept = {a.stream_id for a in live}
        gone = [a.stream_id for a in aggregates if a.state is not None and a.stream_id not in kept]
        if gone and not fresh:
            self.delete(connection, gone)
        if not live:
            return
        db = RowWriter(connection)
        rows = [self._sealed(subject_keys, a, self.table, [self.to_row(a.state) | _stamps(a)], self.sealed)[0] for a in live]
        db.upsert(self.table, self.key, rows)
        if self.children is None:
            return
        child = self.children
        if not fresh:
            db.delete_where_in(child.table, child.parent_key, [row[self.key] for row in rows])
        db.insert(child.table, [r for a in live for r in self._sealed(subject_keys, a, child.table, child.rows(a), child.sealed)])

    def delete(self, connection: Connection, keys: list[str]) -> None:
        db = RowWriter(connection)
        if self.children is not None:
            db.delete_where_in(self.children.table, self.children.parent_key, keys)
        db.delete_where_in(self.table, self.key, keys)

    def forget(self, connection: Connection, subject_id: str) -> list[str]:
        """Delete every row of the subject (the keys of the streams they came from, returned)."""
        assert self.subject is not None, "only a read model with a subject can forget one"
        column = self.table.c[self.subject]
        keys = [row[0] for row in connection.execute(sa.select(self.table.c[self.key]).where(column == subject_id))]
        self.delete(connection, keys)
        return keys

    def clear(self, connection: Connection) -> None:
        for table in self.tables:
            connection.execute(sa.delete(table))

    @staticmethod
    def _sealed(subject_keys: dict[str, Any], aggregate: Aggregate[Any], table: sa.Table, rows: list[Row],
                columns: tuple[str, ...]) -> list[Row]:
        key = subject_keys.get(aggregate.stream_id)
        return rows if key is None or not columns else seal_rows(key, table, rows, columns)


class RowWriter:
    """Bulk row writes on the driver: SQLAlchemy's per-row parameter processing costs
    more than the database does here, and a rebuild writes every row of every read model."""

    # Well under SQLite's and PostgreSQL's limits on parameters in one statement.
    CHUNK = 500

    def __init__(self, connection: Connection) -> None:
        self.connection = connection
        self.dialect = connection.dialect.name

    def upsert(self, table: sa.Table, key: str, rows: list[Row]) -> None:
        self._executemany(_prepared(table, self.dialect, key), rows)

    def insert(self, table: sa.Table, rows: list[Row]) -> None:
        if rows:
            self._executemany(_prepared(table, self.dialect, None), rows)

    def delete_where_in(self, table: sa.Table, column: str, values: list[Any]) -> None:
        execute_chunks(self.connection, f"DELETE FROM {table.name} WHERE {column} IN ({{}})", values, self.CHUNK)

    def _executemany(self, prepared: _Insert, rows: list[Row]) -> None:
        pairs = prepared.pairs
        execute_many(self.connection, prepared.statement, [tuple(encode(row[name]) for name, encode in pairs) for row in rows])


class _Insert:
    def __init__(self, table: sa.Table, dialect: str, conflict_key: str | None) -> None:
        names = [c.name for c in table.columns]
        mark = "?" if dialect == "sqlite" else "%s"
        self.statement = f"INSERT INTO {table.name} ({', '.join(names)}) VALUES ({', '.join([mark] * len(names))})"
        if conflict_key is not None:
            # created_at is the stream's first event: an update never moves it.
            updates = ", ".join(f"{n} = excluded.{n}" for n in names if n not in (conflict_key, "created_at"))
            self.statement += f" ON CONFLICT ({conflict_key}) DO UPDATE SET {updates}"
        self.pairs = [(c.name, encoder(c.type, dialect)) for c in table.columns]


@cache
def _prepared(table: sa.Table, dialect: str, conflict_key: str | None) -> _Insert:
    """Statement text and encoders, built once per table: inline projection runs on every append."""
    return _Insert(table, dialect, conflict_key)


def _stamps(aggregate: Aggregate[Any]) -> Row:
    return {"version": aggregate.version, "created_at": aggregate.created_at, "updated_at": aggregate.updated_at}


def _fields(state: msgspec.Struct, *exclude: str) -> Row:
    return {k: v for k, v in msgspec.to_builtins(state).items() if k not in exclude}


def _genome_layer_rows(aggregate: Aggregate[Any]) -> list[Row]:
    return [
        {"genome_id": aggregate.stream_id, "position": i, "layer_id": ref.layer_id, "weight": ref.weight}
        for i, ref in enumerate(aggregate.state.layers)
    ]


def _academy_row(state: Any) -> Row:
    return _fields(state, "tasks", "challenges", "examples", "trained_steps", "finished_tasks", "needs", "data", "prepared",
                   "evaluations", "decisions") | {
        "planned": state.tasks is not None,
        "challenge_count": len(state.challenges),
        "example_count": state.examples,
        "step": sum(step for _, step in state.trained_steps),
        "layer_ids": [layer_id for _, layer_id in state.finished_tasks],
    }


def _knowledge_row(state: Any) -> Row:
    return _fields(state, "chunks", "erased") | {"chunk_count": len(state.chunks)}


def _knowledge_chunk_rows(aggregate: Aggregate[Any]) -> list[Row]:
    state = aggregate.state
    if state.removed:
        return []
    return [
        {"knowledge_id": state.knowledge_id, "ordinal": i, "persona_id": state.persona_id, "text": text}
        for i, text in enumerate(state.chunks)
    ]


def _conversation_row(state: Any) -> Row:
    return _fields(state, "messages", "erased") | {"message_count": len(state.messages)}


def _conversation_message_rows(aggregate: Aggregate[Any]) -> list[Row]:
    return [
        {"conversation_id": aggregate.stream_id, "ordinal": i, "role": message.role, "content": message.content,
         "generation": msgspec.to_builtins(message.generation) if message.generation is not None else None}
        for i, message in enumerate(aggregate.state.messages)
    ]


def _recipe_row(state: Any) -> Row:
    return _fields(state, "definition") | {"description": state.definition.description,
                                           "step_count": len(state.definition.steps)}


def _recipe_run_row(state: Any) -> Row:
    return _fields(state, "definition", "inputs", "outputs", "skipped", "attempts", "current", "awaited", "output") | {
        "current_step": state.current,
        "waiting_on": state.awaited.stream_id if state.awaited is not None else None,
        "steps_done": len(state.outputs) + len(state.skipped),
        "step_count": len(state.definition.steps),
    }


READ_MODELS: tuple[ReadModel, ...] = (
    ReadModel(
        GENOME,
        GENOMES,
        "genome_id",
        lambda state: _fields(state, "layers"),
        ChildRows(GENOME_LAYER_REFS, "genome_id", _genome_layer_rows),
    ),
    # A user-supplied embedding stays in the log and the index, not in the table.
    ReadModel(LAYER, LAYERS, "layer_id", lambda state: _fields(state, "embedding")),
    ReadModel(PERSONA, PERSONAS, "persona_id", _fields),
    ReadModel(ACADEMY_SESSION, ACADEMY_SESSIONS, "session_id", _academy_row),
    # The content stays in the log, sealed; deleting shreds its key.
    ReadModel(TRAINING_FILE, TRAINING_FILES, "file_id", lambda state: _fields(state, "content", "erased")),
    ReadModel(
        KNOWLEDGE,
        KNOWLEDGE_DOCUMENTS,
        "knowledge_id",
        _knowledge_row,
        ChildRows(KNOWLEDGE_CHUNKS, "knowledge_id", _knowledge_chunk_rows, sealed=("text",)),
        sealed=("title",),
        subject="persona_id",
    ),
    ReadModel(
        CONVERSATION,
        CONVERSATIONS,
        "conversation_id",
        _conversation_row,
        ChildRows(CONVERSATION_MESSAGES, "conversation_id", _conversation_message_rows, sealed=("content",)),
        subject="persona_id",
    ),
    ReadModel(RECIPE, RECIPES, "recipe_id", _recipe_row),
    ReadModel(RECIPE_RUN, RECIPE_RUNS, "run_id", _recipe_run_row),
)
