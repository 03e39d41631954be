"""The one path by which a command becomes events."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

import msgspec

from genome_service.domain.common import Decider
from genome_service.eventstore.errors import ConcurrencyConflict, IdempotencyKeyReused
from genome_service.eventstore.records import (
    NO_METADATA,
    EventMetadata,
    Expect,
    RecordedEvent,
)
from genome_service.eventstore.repository import Aggregate, Repository
from genome_service.projections.projector import Projector

S = TypeVar("S")


class IdempotencyKeyMismatch(Exception):
    """An idempotency key came back with another request than the one it was first used for."""

    def __init__(self) -> None:
        super().__init__(
            "this Idempotency-Key was first used with a different request (method, path, query or body); "
            "repeat that request exactly to get its answer again, or send a new key"
        )


def ensure_same_request(first: RecordedEvent, metadata: EventMetadata) -> None:
    """A retry replays the first answer only if it repeats the first request; appends
    recorded before fingerprints existed, and callers that send none, are taken on trust."""
    fingerprint = first.metadata.request_fingerprint
    if fingerprint is not None and metadata.request_fingerprint is not None and fingerprint != metadata.request_fingerprint:
        raise IdempotencyKeyMismatch()


class Outcome(msgspec.Struct, Generic[S], frozen=True):
    aggregate: Aggregate[S]
    events: tuple[RecordedEvent, ...] = ()
    # True when an idempotency key matched an earlier command: nothing was appended.
    replayed: bool = False


class CommandHandler:
    def __init__(self, repository: Repository, projector: Projector | None, *, conflict_retries: int = 3) -> None:
        self.repository = repository
        self.store = repository.store
        self.projector = projector
        self.conflict_retries = conflict_retries

    def execute(
        self,
        decider: Decider[Any, Any, S],
        stream_id: str,
        command: Any,
        *,
        expected_version: int | None = None,
        metadata: EventMetadata = NO_METADATA,
    ) -> Outcome[S]:
        """Decide on the current state and append the result.

        With ``expected_version`` (a client's If-Match) a stream that moved on is a
        ``ConcurrencyConflict``. Without it, a writer that raced us is absorbed by
        deciding again on the newer state, a few times at most.
        """
        if metadata.idempotency_key is not None:
            prior = self.store.find_idempotent(metadata.idempotency_key)
            if prior is not None:
                return self._replayed(decider, stream_id, prior.stream_id, prior.events, metadata)
        attempts = 1 if expected_version is not None else 1 + self.conflict_retries
        for attempt in range(attempts):
            try:
                return self._execute_once(decider, stream_id, command, expected_version, metadata)
            except ConcurrencyConflict:
                if attempt == attempts - 1:
                    raise
        raise AssertionError("unreachable")

    def _execute_once(
        self,
        decider: Decider[Any, Any, S],
        stream_id: str,
        command: Any,
        expected_version: int | None,
        metadata: EventMetadata,
    ) -> Outcome[S]:
        current = self.repository.load(decider, stream_id)
        if expected_version is not None and expected_version != current.version:
            raise ConcurrencyConflict(stream_id, expected_version, current.version)
        events = decider.decide(command, current.state)
        if not events:
            return Outcome(current)
        with self.store.database.write() as connection:
            result = self.store.append_in(
                connection, stream_id, decider.stream_type, events,
                current.version or Expect.NO_STREAM, metadata,
            )
            if result.replayed:
                return self._replayed(decider, stream_id, result.stream_id, result.events, metadata)
            updated = current.extend(decider, result.events)
            if self.projector is not None:
                self.projector.apply_inline(connection, result, updated)
            self.repository.snapshot_if_due(connection, decider, current.version, updated)
        return Outcome(updated, result.events)

    def _replayed(
        self, decider: Decider[Any, Any, S], stream_id: str, prior_stream: str,
        events: tuple[RecordedEvent, ...], metadata: EventMetadata,
    ) -> Outcome[S]:
        if prior_stream != stream_id:
            raise IdempotencyKeyReused(metadata.idempotency_key or "", stream_id, prior_stream)
        ensure_same_request(events[0], metadata)
        # Answer as the first time: the stream as that append left it.
        return Outcome(self.repository.load(decider, stream_id, to_version=events[-1].version), events, replayed=True)
