"""Creating a stream whose id the server chooses, idempotently."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any, TypeVar

from genome_service.domain.common import Decider
from genome_service.eventstore.errors import IdempotencyKeyReused
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services
from genome_service.services.handler import Outcome, ensure_same_request

S = TypeVar("S")


def new_id() -> str:
    return uuid.uuid4().hex


def create_stream(
    services: Services, decider: Decider[Any, Any, S], metadata: EventMetadata, command: Callable[[str], Any],
) -> Outcome[S]:
    """Create a stream with a fresh id; a retry with the same idempotency key answers as the first did.

    The first answer is the stream as its creating append left it, so a retry
    returns the same body even after later changes.
    """
    key = metadata.idempotency_key
    for _ in range(2):
        if key is not None and (prior := services.store.find_idempotent(key)) is not None:
            if prior.events[0].stream_type != decider.stream_type:
                raise IdempotencyKeyReused(key, f"a new {decider.stream_type}", prior.stream_id)
            ensure_same_request(prior.events[0], metadata)
            aggregate = services.repository.load(decider, prior.stream_id, to_version=prior.events[-1].version)
            return Outcome(aggregate, prior.events, replayed=True)
        stream_id = new_id()
        try:
            return services.commands.execute(decider, stream_id, command(stream_id), metadata=metadata)
        except IdempotencyKeyReused:
            continue  # a concurrent retry created it first: answer with that one
    raise AssertionError("an idempotency key cannot be reused twice in a row")
