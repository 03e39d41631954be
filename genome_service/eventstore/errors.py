"""The event store's own errors; driver errors are wrapped into these once, at the boundary."""

from __future__ import annotations


class EventStoreError(Exception):
    """Base of every error the event store raises."""


class ConcurrencyConflict(EventStoreError):
    """The stream was not at the version the writer expected."""

    def __init__(self, stream_id: str, expected: object, actual: int) -> None:
        super().__init__(
            f"stream {stream_id}: expected version {expected}, but it is at version {actual}"
        )
        self.stream_id = stream_id
        self.expected = expected
        self.actual = actual


class StreamTypeMismatch(EventStoreError):
    def __init__(self, stream_id: str, expected: str, actual: str) -> None:
        super().__init__(f"stream {stream_id} is a {actual} stream, not a {expected} stream")
        self.stream_id = stream_id


class IdempotencyKeyReused(EventStoreError):
    def __init__(self, key: str, stream_id: str, other_stream_id: str) -> None:
        super().__init__(
            f"idempotency key {key!r} was already used for stream {other_stream_id}, not {stream_id}"
        )
        self.key = key


class UnknownEventType(EventStoreError):
    """A stored event names a type (or schema version) this codec cannot read."""


class DatabaseUnavailable(EventStoreError):
    """The database cannot be reached now: refused or dropped connections, a lock held past the
    busy timeout, a file that cannot be opened. Worth retrying; the connection that met it is dropped."""


class UnstorableValue(EventStoreError):
    """A value the database refuses to store as given (PostgreSQL: a NUL character in text)."""
