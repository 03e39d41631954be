"""Load aggregates from their streams (snapshot + tail) and keep snapshots up to date.

A snapshot stores the folded state with its version; loading reads the latest
snapshot at or before the version wanted and replays only the events after it.
A snapshot whose state schema no longer matches the code is ignored, so changing
a state struct never needs a snapshot migration: streams simply replay in full.
Streams that hold personal data are never snapshotted: a snapshot is folded state,
in clear, and would outlive the shredding of the key that seals their events.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from datetime import datetime
from functools import cache
from typing import Any, Generic, NamedTuple, TypeVar

import msgspec
from sqlalchemy.engine import Connection

from genome_service.domain.common import Decider
from genome_service.eventstore.driver import execute, fetch_one
from genome_service.eventstore.records import RecordedEvent
from genome_service.eventstore.store import EventStore

S = TypeVar("S")


class Aggregate(msgspec.Struct, Generic[S], frozen=True, gc=False):
    """A stream's folded state, with the version and times of its first and last event."""

    stream_id: str
    state: S | None = None
    version: int = 0
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def extend(self, decider: Decider[Any, Any, S], recorded: Sequence[RecordedEvent]) -> Aggregate[S]:
        if not recorded:
            return self
        state = decider.fold(self.state, [r.event for r in recorded])
        return Aggregate(
            self.stream_id,
            state,
            recorded[-1].version,
            self.created_at or recorded[0].recorded_at,
            recorded[-1].recorded_at,
        )


class SnapshotRow(NamedTuple):
    """A stored snapshot: its version, the fingerprint of the state schema it was written with, its JSON."""

    version: int
    state_schema: str
    data: str


@cache
def _snapshot_codec(state_type: type) -> tuple[str, msgspec.json.Decoder]:
    schema = msgspec.json.encode(msgspec.json.schema(Aggregate[state_type]))  # type: ignore[valid-type]
    fingerprint = hashlib.sha256(schema).hexdigest()[:32]
    return fingerprint, msgspec.json.Decoder(Aggregate[state_type])  # type: ignore[valid-type]


class Repository:
    def __init__(self, store: EventStore, *, snapshot_every: int = 100, never_snapshot: Iterable[str] = ()) -> None:
        """``never_snapshot``: stream types whose state must not be stored outside their (sealed) events."""
        self.store = store
        self.snapshot_every = snapshot_every
        self.never_snapshot = frozenset(never_snapshot)
        db = store.database
        self._select_snapshot = db.sql("SELECT version, state_schema, data FROM snapshots WHERE stream_id = ?")
        self._upsert_snapshot = db.sql(
            "INSERT INTO snapshots (stream_id, stream_type, version, state_schema, data, recorded_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (stream_id) DO UPDATE SET "
            "stream_type = excluded.stream_type, version = excluded.version, "
            "state_schema = excluded.state_schema, data = excluded.data, recorded_at = excluded.recorded_at"
        )

    def load(
        self,
        decider: Decider[Any, Any, S],
        stream_id: str,
        *,
        to_version: int | None = None,
        as_of: datetime | None = None,
        use_snapshot: bool = True,
        connection: Connection | None = None,
    ) -> Aggregate[S]:
        """The aggregate now, or as it was at ``to_version`` / at time ``as_of``."""
        start: Aggregate[S] = Aggregate(stream_id)
        if use_snapshot and decider.stream_type not in self.never_snapshot:
            snapshot = self._load_snapshot(decider, stream_id, connection)
            if snapshot is not None and _usable(snapshot, to_version, as_of):
                start = snapshot
        tail = self.store.read_stream(
            stream_id, after_version=start.version, to_version=to_version, as_of=as_of, connection=connection
        )
        return start.extend(decider, tail)

    def _load_snapshot(self, decider: Decider[Any, Any, S], stream_id: str, connection: Connection | None) -> Aggregate[S] | None:
        if connection is None:
            with self.store.database.read() as own:
                return self._load_snapshot(decider, stream_id, own)
        row = fetch_one(connection, self._select_snapshot, (stream_id,), SnapshotRow)
        fingerprint, decoder = _snapshot_codec(decider.state_type)
        if row is None or row.state_schema != fingerprint:
            return None
        return decoder.decode(row.data)

    def snapshot_if_due(self, connection: Connection, decider: Decider[Any, Any, S], before: int, after: Aggregate[S]) -> bool:
        """Write a snapshot when the stream's version crossed a multiple of ``snapshot_every``."""
        if after.version // self.snapshot_every == before // self.snapshot_every or decider.stream_type in self.never_snapshot:
            return False
        self.save_snapshot(connection, decider, after)
        return True

    def save_snapshot(self, connection: Connection, decider: Decider[Any, Any, S], aggregate: Aggregate[S]) -> None:
        fingerprint, _ = _snapshot_codec(decider.state_type)
        db = self.store.database
        assert aggregate.updated_at is not None, "only a stream with events has a snapshot"
        execute(
            connection,
            self._upsert_snapshot,
            (aggregate.stream_id, decider.stream_type, aggregate.version, fingerprint,
             msgspec.json.encode(aggregate).decode(), db.to_db_time(aggregate.updated_at)),
        )


def _usable(snapshot: Aggregate[Any], to_version: int | None, as_of: datetime | None) -> bool:
    if to_version is not None and snapshot.version > to_version:
        return False
    return as_of is None or (snapshot.updated_at is not None and snapshot.updated_at <= as_of)
