"""Keeps a group of read models in step with the log, behind one checkpoint.

- inline: inside the appending transaction (read-your-writes). If another process
  appended without projecting, the gap up to this append is applied first, so
  the checkpoint only ever moves over events that were applied.
- catch-up: any process applies what the log holds beyond the checkpoint.
- rebuild: clears the tables and folds the whole log again, in one transaction.
"""

from __future__ import annotations

import gc
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from sqlalchemy.engine import Connection

from genome_service.eventstore.data_keys import DataKeys
from genome_service.eventstore.driver import execute, fetch_value
from genome_service.eventstore.records import AppendResult, RecordedEvent
from genome_service.eventstore.repository import Aggregate, Repository
from genome_service.projections.read_models import ReadModel

Progress = Callable[[int, int], None]
# stream id -> (its read model, its folded aggregate)
Folded = dict[str, tuple[ReadModel, Aggregate[Any]]]


class Projector:
    def __init__(self, repository: Repository, read_models: Sequence[ReadModel], *, name: str = "read_models",
                 batch_size: int = 5000, keys: DataKeys | None = None) -> None:
        """``keys``: seal the read models' personal columns (stored in clear without)."""
        self.repository = repository
        self.keys = keys
        self.store = repository.store
        self.name = name
        self.batch_size = batch_size
        self.read_models = {model.decider.stream_type: model for model in read_models}
        db = self.store.database
        lock = " FOR UPDATE" if db.dialect == "postgresql" else ""
        self._select_checkpoint = db.sql(f"SELECT position FROM projection_checkpoints WHERE name = ?{lock}")
        self._upsert_checkpoint = db.sql(
            "INSERT INTO projection_checkpoints (name, position) VALUES (?, ?) "
            "ON CONFLICT (name) DO UPDATE SET position = excluded.position"
        )

    def apply_inline(self, connection: Connection, result: AppendResult, aggregate: Aggregate[Any]) -> None:
        """Project an append in its own transaction, given the aggregate it produced."""
        checkpoint = self.checkpoint(connection)
        first = result.events[0].position
        if checkpoint < first - 1:
            gap = self.store.read_all(after_position=checkpoint, limit=first - 1 - checkpoint, connection=connection)
            self._apply(connection, gap, {})
        if result.events[0].stream_type in self.read_models:
            self.read_models[result.events[0].stream_type].write(connection, [aggregate], keys=self.keys)
        self._set_checkpoint(connection, result.events[-1].position)

    def catch_up(self, progress: Progress | None = None) -> int:
        """Apply every event past the checkpoint; returns how many were applied."""
        applied = 0
        while True:
            with self.store.database.write() as connection:
                checkpoint = self.checkpoint(connection)
                batch = self.store.read_all(after_position=checkpoint, limit=self.batch_size, connection=connection)
                if not batch:
                    return applied
                self._apply(connection, batch, {})
                self._set_checkpoint(connection, batch[-1].position)
            applied += len(batch)
            if progress is not None:
                progress(applied, 0)

    def rebuild(self, progress: Progress | None = None) -> int:
        """Recreate the read models from the first event; readers see the old rows until commit."""
        with _cyclic_gc_paused(), self.store.database.write() as connection:
            total = self.store.last_position(connection)
            for model in self.read_models.values():
                model.clear(connection)
            folded: Folded = {}
            position = 0
            while batch := self.store.read_all(after_position=position, limit=self.batch_size, connection=connection):
                self._fold(connection, batch, folded)
                position = batch[-1].position
                if progress is not None:
                    progress(position, total)
            self._write(connection, folded, fresh=True)
            self._set_checkpoint(connection, position)
            return position

    def forget(self, connection: Connection, subject_id: str) -> list[str]:
        """Delete every read-model row of a subject whose personal data is erased; returns their stream ids."""
        return [key for model in self.read_models.values() if model.subject is not None
                for key in model.forget(connection, subject_id)]

    def checkpoint(self, connection: Connection) -> int:
        return fetch_value(connection, self._select_checkpoint, (self.name,)) or 0

    def _set_checkpoint(self, connection: Connection, position: int) -> None:
        execute(connection, self._upsert_checkpoint, (self.name, position))

    def _apply(self, connection: Connection, events: Sequence[RecordedEvent], folded: Folded) -> None:
        touched = self._fold(connection, events, folded)
        self._write(connection, {stream_id: folded[stream_id] for stream_id in touched})

    def _fold(self, connection: Connection, events: Sequence[RecordedEvent], folded: Folded) -> set[str]:
        """Fold events into ``folded``, loading a stream's earlier state on first sight."""
        by_stream: dict[str, list[RecordedEvent]] = {}
        for event in events:
            if event.stream_type in self.read_models:
                by_stream.setdefault(event.stream_id, []).append(event)
        for stream_id, stream_events in by_stream.items():
            model = self.read_models[stream_events[0].stream_type]
            if stream_id in folded:
                aggregate = folded[stream_id][1]
            elif before := stream_events[0].version - 1:
                aggregate = self.repository.load(model.decider, stream_id, to_version=before, connection=connection)
            else:
                aggregate = Aggregate(stream_id)
            folded[stream_id] = (model, aggregate.extend(model.decider, stream_events))
        return set(by_stream)

    def _write(self, connection: Connection, folded: Folded, *, fresh: bool = False) -> None:
        groups: dict[str, list[Aggregate[Any]]] = {}
        for model, aggregate in folded.values():
            groups.setdefault(model.decider.stream_type, []).append(aggregate)
        for stream_type, aggregates in groups.items():
            self.read_models[stream_type].write(connection, aggregates, fresh=fresh, keys=self.keys)


@contextmanager
def _cyclic_gc_paused() -> Iterator[None]:
    """A rebuild allocates millions of short-lived, acyclic objects and keeps every
    folded aggregate alive; the cyclic collector would rescan that growing heap
    again and again (a quarter of the time at 100k events) and find nothing."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
