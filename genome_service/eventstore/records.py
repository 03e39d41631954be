"""The value types that cross the event store's boundary."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import Any

import msgspec


class Expect(enum.Enum):
    """Expected stream versions that are not an exact number."""

    ANY = "any"
    NO_STREAM = "no stream"

    def __str__(self) -> str:
        return self.value


# An exact version (>= 1), or one of ``Expect``.
ExpectedVersion = int | Expect


class EventMetadata(msgspec.Struct, frozen=True, omit_defaults=True, kw_only=True, gc=False):
    actor: str | None = None
    correlation_id: str | None = None
    causation_id: str | None = None
    idempotency_key: str | None = None
    # SHA-256 of the request an idempotency key was first used for: a retry must repeat it.
    request_fingerprint: str | None = None


NO_METADATA = EventMetadata()


# gc=False: these hold no reference cycles, and a rebuild makes millions of them;
# untracked, they cost the cyclic garbage collector nothing.
class RecordedEvent(msgspec.Struct, frozen=True, gc=False):
    position: int
    stream_id: str
    stream_type: str
    version: int
    type: str
    schema_version: int
    event: Any
    metadata: EventMetadata
    recorded_at: datetime


class AppendResult(msgspec.Struct, frozen=True):
    stream_id: str
    events: tuple[RecordedEvent, ...]
    # True when an idempotency key matched an earlier append: nothing new was written.
    replayed: bool = False

    @property
    def version(self) -> int:
        return self.events[-1].version if self.events else 0
