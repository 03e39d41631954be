"""The event store: append with an expected version, read a stream or the whole log.

Positions are global, gapless and ascend in commit order: each append takes the
database's write lock first (SQLite's ``BEGIN IMMEDIATE``; on PostgreSQL
``LOCK TABLE events IN EXCLUSIVE MODE``, which blocks other writers but not
readers) and numbers its events from the highest committed position. A catch-up
reader that has seen position p therefore never meets a later commit below p.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import UTC, datetime
from typing import Any, NamedTuple

import msgspec
from sqlalchemy.engine import Connection

from genome_service.eventstore.codec import EventCodec
from genome_service.eventstore.database import Database
from genome_service.eventstore.driver import execute, execute_many, fetch_all, fetch_one, fetch_value
from genome_service.eventstore.errors import (
    ConcurrencyConflict,
    IdempotencyKeyReused,
    StreamTypeMismatch,
)
from genome_service.eventstore.records import (
    NO_METADATA,
    AppendResult,
    EventMetadata,
    Expect,
    ExpectedVersion,
    RecordedEvent,
)
from genome_service.eventstore.sealing import Sealer

# PostgreSQL NOTIFY channel: a trigger on events notifies it per INSERT statement,
# delivered at commit, so a listener never hears of an uncommitted event.
NOTIFY_CHANNEL = "genome_events"
_COLUMNS = "position, stream_id, stream_type, version, type, schema_version, data, metadata, recorded_at"
_metadata_encoder = msgspec.json.Encoder()
_metadata_decoder = msgspec.json.Decoder(EventMetadata)


class EventRow(NamedTuple):
    """A row of ``events``, as stored (``_COLUMNS``)."""

    position: int
    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    data: str
    metadata: str
    recorded_at: Any  # ISO 8601 text on SQLite, a datetime on PostgreSQL


class AppendState(NamedTuple):
    """What an append checks first: its stream's head (None for a new stream) and the log's last position."""

    version: int | None
    stream_type: str | None
    last_position: int | None


class IdempotencyKeyRow(NamedTuple):
    """The append an idempotency key made: its stream and the positions it recorded."""

    stream_id: str
    first_position: int
    last_position: int


class EventStore:
    def __init__(self, database: Database, codec: EventCodec, sealer: Sealer | None = None) -> None:
        """``sealer``: seals the personal fields of the event types it names (none without one)."""
        self.database = database
        self.codec = codec
        self.sealer = sealer
        sql = database.sql
        self._first_event = sql("SELECT data FROM events WHERE stream_id = ? AND version = 1")
        self._insert = sql(f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
        self._stream_version = sql("SELECT version FROM events WHERE stream_id = ? ORDER BY version DESC LIMIT 1")
        # The stream's head and the log's last position in one round trip.
        self._append_state = sql(
            "SELECT head.version, head.stream_type, (SELECT max(position) FROM events) FROM (SELECT 1) AS one "
            "LEFT JOIN (SELECT version, stream_type FROM events WHERE stream_id = ? ORDER BY version DESC LIMIT 1) "
            "AS head ON 1 = 1"
        )
        self._last_position = "SELECT max(position) FROM events"
        self._find_key = sql("SELECT stream_id, first_position, last_position FROM idempotency_keys WHERE key = ?")
        self._insert_key = sql(
            "INSERT INTO idempotency_keys (key, stream_id, first_position, last_position) VALUES (?, ?, ?, ?)"
        )
        self._select_stream = sql(f"SELECT {_COLUMNS} FROM events WHERE stream_id = ? AND version > ?")
        self._select_range = sql(f"SELECT {_COLUMNS} FROM events WHERE position >= ? AND position <= ? ORDER BY position")
        self._select_all = sql(f"SELECT {_COLUMNS} FROM events WHERE position > ? ORDER BY position LIMIT ?")

    # Writing
    def append(
        self,
        stream_id: str,
        stream_type: str,
        events: Sequence[msgspec.Struct],
        expected: ExpectedVersion,
        metadata: EventMetadata = NO_METADATA,
    ) -> AppendResult:
        """Append in a transaction of its own; see ``append_in``."""
        with self.database.write() as connection:
            return self.append_in(connection, stream_id, stream_type, events, expected, metadata)

    def append_in(
        self,
        connection: Connection,
        stream_id: str,
        stream_type: str,
        events: Sequence[msgspec.Struct],
        expected: ExpectedVersion,
        metadata: EventMetadata = NO_METADATA,
    ) -> AppendResult:
        """Append ``events`` atomically inside the caller's write transaction.

        Raises ``ConcurrencyConflict`` when the stream is not at ``expected``. An
        idempotency key seen before makes this a no-op that returns the events
        the first append recorded.
        """
        if not events:
            raise ValueError("append needs at least one event")
        if isinstance(expected, int) and expected < 1:
            raise ValueError("an exact expected version is >= 1; use Expect.NO_STREAM for a new stream")
        if self.database.dialect == "postgresql":
            execute(connection, "LOCK TABLE events IN EXCLUSIVE MODE")
        key = metadata.idempotency_key
        if key is not None:
            prior = self._replay(connection, key, stream_id)
            if prior is not None:
                return prior
        state = fetch_one(connection, self._append_state, (stream_id,), AppendState)
        assert state is not None, "the append state query answers one row, even on an empty log"
        actual, last_position = state.version or 0, state.last_position or 0
        if state.stream_type is not None and state.stream_type != stream_type:
            raise StreamTypeMismatch(stream_id, stream_type, state.stream_type)
        if not _matches(expected, actual):
            raise ConcurrencyConflict(stream_id, expected, actual)
        recorded_at = datetime.now(UTC)
        db_time = self.database.to_db_time(recorded_at)
        meta_json = _metadata_encoder.encode(metadata).decode()
        codec, sealer = self.codec, self.sealer
        recorded: list[RecordedEvent] = []
        rows: list[EventRow] = []
        for offset, event in enumerate(events, start=1):
            type_name = codec.type_of(event)
            schema_version = codec.schema_version(type_name)
            position, version = last_position + offset, actual + offset
            data = codec.encode(event)
            if sealer is not None and sealer.seals(type_name):
                first = rows[0].data if rows and actual == 0 else None
                data = self._seal(connection, stream_id, version, type_name, data, first)
            rows.append(EventRow(position, stream_id, stream_type, version, type_name, schema_version, data, meta_json, db_time))
            recorded.append(
                RecordedEvent(position, stream_id, stream_type, version, type_name,
                              schema_version, event, metadata, recorded_at)
            )
        execute_many(connection, self._insert, rows)
        if key is not None:
            execute(connection, self._insert_key, (key, stream_id, recorded[0].position, recorded[-1].position))
        return AppendResult(stream_id, tuple(recorded))

    def _seal(self, connection: Connection, stream_id: str, version: int, type_name: str, data: str, first: str | None) -> str:
        """The event's JSON with its personal fields sealed for its subject (named by it or its stream's first event)."""
        sealer = self.sealer
        assert sealer is not None
        raw = msgspec.json.decode(data)
        subject = sealer.subject_in(type_name, raw)
        if subject is None:
            if first is None:
                first = fetch_value(connection, self._first_event, (stream_id,)) or "{}"
            subject = sealer.subject_in(type_name, msgspec.json.decode(first))
        if subject is None:
            raise ValueError(f"{type_name} in stream {stream_id} names no subject to seal its personal data for")
        key = sealer.keys.for_writing(connection, subject)
        return msgspec.json.encode(sealer.seal(key, subject, stream_id, version, type_name, raw)).decode()

    def _replay(self, connection: Connection, key: str, stream_id: str) -> AppendResult | None:
        prior = fetch_one(connection, self._find_key, (key,), IdempotencyKeyRow)
        if prior is None:
            return None
        if prior.stream_id != stream_id:
            raise IdempotencyKeyReused(key, stream_id, prior.stream_id)
        return self._replayed(connection, prior)

    def find_idempotent(self, key: str) -> AppendResult | None:
        """The append an idempotency key already made, if any (read-only, outside a write)."""
        with self.database.read() as connection:
            prior = fetch_one(connection, self._find_key, (key,), IdempotencyKeyRow)
            return None if prior is None else self._replayed(connection, prior)

    def _replayed(self, connection: Connection, prior: IdempotencyKeyRow) -> AppendResult:
        rows = fetch_all(connection, self._select_range, (prior.first_position, prior.last_position), EventRow)
        return AppendResult(prior.stream_id, tuple(self._decode_rows(rows, connection)), replayed=True)

    # Reading
    def read_stream(
        self,
        stream_id: str,
        *,
        after_version: int = 0,
        to_version: int | None = None,
        as_of: datetime | None = None,
        connection: Connection | None = None,
    ) -> list[RecordedEvent]:
        """Events of one stream in version order; ``to_version``/``as_of`` travel back in time."""
        statement, params = self._select_stream, [stream_id, after_version]
        if to_version is not None:
            statement += self.database.sql(" AND version <= ?")
            params.append(to_version)
        if as_of is not None:
            statement += self.database.sql(" AND recorded_at <= ?")
            params.append(self.database.to_db_time(as_of))
        statement += " ORDER BY version"
        return self._fetch(statement, params, connection)

    def read_all(self, *, after_position: int = 0, limit: int = 1000, connection: Connection | None = None) -> list[RecordedEvent]:
        """Up to ``limit`` events of the whole log after ``after_position``, in position order."""
        return self._fetch(self._select_all, (after_position, limit), connection)

    def iter_all(self, *, after_position: int = 0, batch_size: int = 5000) -> Iterator[list[RecordedEvent]]:
        """The whole log from ``after_position`` as it stands now, in batches."""
        while batch := self.read_all(after_position=after_position, limit=batch_size):
            yield batch
            after_position = batch[-1].position

    def last_position(self, connection: Connection | None = None) -> int:
        # Through SQLAlchemy on purpose: it opens the read transaction (SQLite's BEGIN), so the
        # driver-level reads after it on the same connection (the projection checkpoint) see the same snapshot.
        if connection is not None:
            return connection.exec_driver_sql(self._last_position).scalar() or 0
        with self.database.read() as own:
            return own.exec_driver_sql(self._last_position).scalar() or 0

    def stream_version(self, stream_id: str) -> int:
        with self.database.read() as connection:
            return fetch_value(connection, self._stream_version, (stream_id,)) or 0

    def _fetch(self, statement: str, params: Sequence[Any], connection: Connection | None) -> list[RecordedEvent]:
        if connection is None:
            with self.database.read() as own:
                return self._fetch(statement, params, own)
        return self._decode_rows(fetch_all(connection, statement, tuple(params), EventRow), connection)

    def _decode_rows(self, rows: Sequence[EventRow], connection: Connection) -> list[RecordedEvent]:
        decode, from_time = self.codec.decode, self.database.from_db_time
        opened = self._open_sealed(rows, connection)
        metadata_cache: dict[str, EventMetadata] = {}
        out = []
        for position, stream_id, stream_type, version, type_name, schema_version, data, meta, at in rows:
            metadata = metadata_cache.get(meta)
            if metadata is None:
                metadata = metadata_cache[meta] = _metadata_decoder.decode(meta)
            event = opened[position] if position in opened else decode(type_name, schema_version, data)
            out.append(
                RecordedEvent(position, stream_id, stream_type, version, type_name, schema_version,
                              event, metadata, from_time(at))
            )
        return out

    def _open_sealed(self, rows: Sequence[EventRow], connection: Connection) -> dict[int, Any]:
        """The events among ``rows`` that carry sealed fields, opened with their subjects' keys (one query)."""
        sealer = self.sealer
        if sealer is None:
            return {}
        parsed = {row.position: msgspec.json.decode(row.data) for row in rows if sealer.seals(row.type)}
        subjects = {s for raw in parsed.values() if (s := sealer.subject_of(raw)) is not None}
        keys = sealer.keys.for_reading(connection, subjects) if subjects else {}
        opened = {}
        for row in rows:
            raw = parsed.get(row.position)
            if raw is not None:
                subject = sealer.subject_of(raw)
                key = keys[subject] if subject is not None else None
                opened[row.position] = self.codec.decode_raw(
                    row.type, row.schema_version, sealer.open(key, row.stream_id, row.version, row.type, raw)
                )
        return opened


def _matches(expected: ExpectedVersion, actual: int) -> bool:
    if expected is Expect.ANY:
        return True
    if expected is Expect.NO_STREAM:
        return actual == 0
    return expected == actual



