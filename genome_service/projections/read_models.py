"""How each aggregate's state maps onto its read-model rows.

A read model is a pure function of the folded state, so projecting reuses the
domain's own ``evolve`` and no rule is written twice (once as a decision, once
as SQL).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import msgspec
import sqlalchemy as sa
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Connection

from genome_service.domain.academy import ACADEMY_SESSION
from genome_service.domain.common import Decider
from genome_service.domain.genome import GENOME
from genome_service.domain.layer import LAYER
from genome_service.domain.persona import PERSONA
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.tables import (
    AcademySessionRow,
    GenomeLayerRefRow,
    GenomeRow,
    LayerRow,
    PersonaRow,
)

Row = dict[str, Any]


class ChildRows(msgspec.Struct, frozen=True):
    """Rows owned by one parent row, replaced whole whenever the parent changes."""

    table: sa.Table
    parent_key: str
    rows: Callable[[Aggregate[Any]], list[Row]]


class ReadModel(msgspec.Struct, frozen=True):
    decider: Decider[Any, Any, Any]
    table: sa.Table
    key: str
    to_row: Callable[[Any], Row]
    children: ChildRows | None = None

    @property
    def tables(self) -> tuple[sa.Table, ...]:
        return (self.table,) if self.children is None else (self.table, self.children.table)

    def write(self, connection: Connection, aggregates: Sequence[Aggregate[Any]]) -> None:
        rows = [self.to_row(a.state) | _stamps(a) for a in aggregates if a.state is not None]
        if not rows:
            return
        connection.execute(_upsert(connection, self.table, self.key), rows)
        if self.children is not None:
            child = self.children
            ids = [row[self.key] for row in rows]
            connection.execute(sa.delete(child.table).where(child.table.c[child.parent_key].in_(ids)))
            child_rows = [r for a in aggregates if a.state is not None for r in child.rows(a)]
            if child_rows:
                connection.execute(sa.insert(child.table), child_rows)

    def clear(self, connection: Connection) -> None:
        for table in self.tables:
            connection.execute(sa.delete(table))


def _stamps(aggregate: Aggregate[Any]) -> Row:
    return {"version": aggregate.version, "created_at": aggregate.created_at, "updated_at": aggregate.updated_at}


def _upsert(connection: Connection, table: sa.Table, key: str) -> sa.Insert:
    insert = (postgresql if connection.dialect.name == "postgresql" else sqlite).insert(table)
    # created_at is the stream's first event: an update never moves it.
    keep = {key, "created_at"}
    return insert.on_conflict_do_update(
        index_elements=[key],
        set_={c.name: insert.excluded[c.name] for c in table.columns if c.name not in keep},
    )


def _fields(state: msgspec.Struct, *exclude: str) -> Row:
    return {k: v for k, v in msgspec.to_builtins(state).items() if k not in exclude}


def _genome_layer_rows(aggregate: Aggregate[Any]) -> list[Row]:
    return [
        {"genome_id": aggregate.stream_id, "position": i, "layer_id": ref.layer_id, "weight": ref.weight}
        for i, ref in enumerate(aggregate.state.layers)
    ]


READ_MODELS: tuple[ReadModel, ...] = (
    ReadModel(
        GENOME,
        GenomeRow.__table__,  # type: ignore[attr-defined]
        "genome_id",
        lambda state: _fields(state, "layers"),
        ChildRows(GenomeLayerRefRow.__table__, "genome_id", _genome_layer_rows),  # type: ignore[attr-defined]
    ),
    ReadModel(LAYER, LayerRow.__table__, "layer_id", _fields),  # type: ignore[attr-defined]
    ReadModel(PERSONA, PersonaRow.__table__, "persona_id", _fields),  # type: ignore[attr-defined]
    ReadModel(ACADEMY_SESSION, AcademySessionRow.__table__, "session_id", _fields),  # type: ignore[attr-defined]
)
