"""Who is asking, and on what terms: what every feature service operation takes first.

Reads take a ``Caller``; writes take a ``Command``, which adds the event metadata (actor,
correlation id, idempotency key and request fingerprint) and the version the caller
expects the stream to be at (HTTP's If-Match). The REST API, the CLI and any other front
door build these once per request and hand them down unchanged.
"""

from __future__ import annotations

import msgspec

from genome_service.eventstore.records import EventMetadata

__all__ = ["OPEN_OWNER", "Caller", "Command", "EventMetadata", "command_metadata"]

# Who every request acts as while no API key exists (open mode, loopback only).
OPEN_OWNER = "local"


class Caller(msgspec.Struct, frozen=True):
    owner: str


class Command(msgspec.Struct, frozen=True):
    caller: Caller
    metadata: EventMetadata
    expected_version: int | None = None

    @property
    def owner(self) -> str:
        return self.caller.owner

    def derived(self, part: str) -> Command:
        """The same request's metadata for a second stream it writes: its idempotency key gets
        ``part`` appended, so a retry replays each stream's append and none is mistaken for another."""
        key = self.metadata.idempotency_key
        metadata = msgspec.structs.replace(self.metadata, idempotency_key=f"{key}:{part}" if key else None)
        return Command(self.caller, metadata, None)


def command_metadata(
    owner: str, operation: str, *, idempotency_key: str | None = None, correlation_id: str | None = None,
    fingerprint: str | None = None,
) -> EventMetadata:
    """Who asked, and the idempotency key namespaced by owner and operation: a key never
    replays another owner's request, nor a different kind of request."""
    return EventMetadata(
        actor=owner,
        correlation_id=correlation_id[:200] if correlation_id else None,
        idempotency_key=f"{owner}:{operation}:{idempotency_key}" if idempotency_key is not None else None,
        request_fingerprint=fingerprint,
    )
