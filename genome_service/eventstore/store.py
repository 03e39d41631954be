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
from typing import Any

import msgspec
from sqlalchemy.engine import Connection

from genome_service.eventstore.codec import EventCodec
from genome_service.eventstore.database import Database
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


class EventStore:
    def __init__(self, database: Database, codec: EventCodec, sealer: Sealer | None = None) -> None:
        """``sealer``: seals the personal fields of the event types it names (none without one)."""
        self.database = database
        self.codec = codec
        self.sealer = sealer
        sql = database.sql
        self._first_event = sql("SELECT data FROM events WHERE stream_id = ? AND version = 1")
        self._insert = sql(f"INSERT INTO events ({_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)")
        self._stream_head = sql(
            "SELECT version, stream_type FROM events WHERE stream_id = ? ORDER BY version DESC LIMIT 1"
        )
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
        cursor = connection.connection.cursor()
        try:
            if self.database.dialect == "postgresql":
                cursor.execute("LOCK TABLE events IN EXCLUSIVE MODE")
            key = metadata.idempotency_key
            if key is not None:
                prior = self._replay(connection, cursor, key, stream_id)
                if prior is not None:
                    return prior
            cursor.execute(self._append_state, (stream_id,))
            head_version, head_type, last_position = cursor.fetchone()
            actual, last_position = head_version or 0, last_position or 0
            if head_type is not None and head_type != stream_type:
                raise StreamTypeMismatch(stream_id, stream_type, head_type)
            if not _matches(expected, actual):
                raise ConcurrencyConflict(stream_id, expected, actual)
            recorded_at = datetime.now(UTC)
            db_time = self.database.to_db_time(recorded_at)
            meta_json = _metadata_encoder.encode(metadata).decode()
            codec, sealer = self.codec, self.sealer
            recorded: list[RecordedEvent] = []
            rows: list[tuple[Any, ...]] = []
            for offset, event in enumerate(events, start=1):
                type_name = codec.type_of(event)
                schema_version = codec.schema_version(type_name)
                position, version = last_position + offset, actual + offset
                data = codec.encode(event)
                if sealer is not None and sealer.seals(type_name):
                    first = rows[0][6] if rows and actual == 0 else None
                    data = self._seal(connection, stream_id, version, type_name, data, first)
                rows.append(
                    (position, stream_id, stream_type, version, type_name, schema_version, data, meta_json, db_time)
                )
                recorded.append(
                    RecordedEvent(position, stream_id, stream_type, version, type_name,
                                  schema_version, event, metadata, recorded_at)
                )
            cursor.executemany(self._insert, rows)
            if key is not None:
                cursor.execute(self._insert_key, (key, stream_id, recorded[0].position, recorded[-1].position))
        finally:
            cursor.close()
        return AppendResult(stream_id, tuple(recorded))

    def _seal(self, connection: Connection, stream_id: str, version: int, type_name: str, data: str, first: str | None) -> str:
        """The event's JSON with its personal fields sealed for its subject (named by it or its stream's first event)."""
        sealer = self.sealer
        assert sealer is not None
        raw = msgspec.json.decode(data)
        subject = sealer.subject_in(type_name, raw)
        if subject is None:
            if first is None:
                cursor = connection.connection.cursor()
                try:
                    cursor.execute(self._first_event, (stream_id,))
                    row = cursor.fetchone()
                finally:
                    cursor.close()
                first = row[0] if row else "{}"
            subject = sealer.subject_in(type_name, msgspec.json.decode(first))
        if subject is None:
            raise ValueError(f"{type_name} in stream {stream_id} names no subject to seal its personal data for")
        key = sealer.keys.for_writing(connection, subject)
        return msgspec.json.encode(sealer.seal(key, subject, stream_id, version, type_name, raw)).decode()

    def _replay(self, connection: Connection, cursor: Any, key: str, stream_id: str) -> AppendResult | None:
        cursor.execute(self._find_key, (key,))
        row = cursor.fetchone()
        if row is None:
            return None
        if row[0] != stream_id:
            raise IdempotencyKeyReused(key, stream_id, row[0])
        cursor.execute(self._select_range, (row[1], row[2]))
        return AppendResult(stream_id, tuple(self._decode_rows(cursor.fetchall(), connection)), replayed=True)

    def find_idempotent(self, key: str) -> AppendResult | None:
        """The append an idempotency key already made, if any (read-only, outside a write)."""
        with self.database.read() as connection:
            cursor = connection.connection.cursor()
            cursor.execute(self._find_key, (key,))
            row = cursor.fetchone()
            if row is None:
                return None
            cursor.execute(self._select_range, (row[1], row[2]))
            return AppendResult(row[0], tuple(self._decode_rows(cursor.fetchall(), connection)), replayed=True)

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
        if connection is not None:
            return connection.exec_driver_sql(self._last_position).scalar() or 0
        with self.database.read() as own:
            return own.exec_driver_sql(self._last_position).scalar() or 0

    def stream_version(self, stream_id: str) -> int:
        with self.database.read() as connection:
            cursor = connection.connection.cursor()
            cursor.execute(self._stream_head, (stream_id,))
            row = cursor.fetchone()
            return row[0] if row else 0

    def _fetch(self, statement: str, params: Sequence[Any], connection: Connection | None) -> list[RecordedEvent]:
        if connection is None:
            with self.database.read() as own:
                return self._fetch(statement, params, own)
        cursor = connection.connection.cursor()
        try:
            cursor.execute(statement, tuple(params))
            rows = cursor.fetchall()
        finally:
            cursor.close()
        return self._decode_rows(rows, connection)

    def _decode_rows(self, rows: Sequence[Sequence[Any]], connection: Connection) -> list[RecordedEvent]:
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

    def _open_sealed(self, rows: Sequence[Sequence[Any]], connection: Connection) -> dict[int, Any]:
        """The events among ``rows`` that carry sealed fields, opened with their subjects' keys (one query)."""
        sealer = self.sealer
        if sealer is None:
            return {}
        parsed = {row[0]: msgspec.json.decode(row[6]) for row in rows if sealer.seals(row[4])}
        subjects = {s for raw in parsed.values() if (s := sealer.subject_of(raw)) is not None}
        keys = sealer.keys.for_reading(connection, subjects) if subjects else {}
        opened = {}
        for position, stream_id, _, version, type_name, schema_version, *_ in rows:
            raw = parsed.get(position)
            if raw is not None:
                subject = sealer.subject_of(raw)
                key = keys[subject] if subject is not None else None
                opened[position] = self.codec.decode_raw(type_name, schema_version, sealer.open(key, stream_id, version, type_name, raw))
        return opened


def _matches(expected: ExpectedVersion, actual: int) -> bool:
    if expected is Expect.ANY:
        return True
    if expected is Expect.NO_STREAM:
        return actual == 0
    return expected == actual



