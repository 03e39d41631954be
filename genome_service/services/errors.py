"""What a feature service refuses, independent of any protocol; `api/errors.py` maps each to HTTP.

Domain rules raise ``DomainError`` from the aggregates; these are the refusals that come
before any aggregate decides: a resource the caller may not see, one that is archived, a
change only its owner may make, or input the service cannot read. The event store's errors
(a stale version, a database that cannot be reached, a value it cannot store) pass through.
"""

from __future__ import annotations

# The store's own errors reach every front door through here, wrapped once at its boundary.
from genome_service.eventstore.data_keys import SubjectErased
from genome_service.eventstore.errors import (
    ConcurrencyConflict,
    DatabaseUnavailable,
    IdempotencyKeyReused,
    UnstorableValue,
)

__all__ = [
    "ConcurrencyConflict", "DatabaseUnavailable", "Forbidden", "Gone", "IdempotencyKeyReused", "InvalidRequest",
    "NotFound", "PersonaDataErased", "SubjectErased", "Unauthorized", "UnstorableValue",
]


class NotFound(Exception):
    """No such resource, or another owner's private one: the two look the same to a caller."""

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"no {kind} {resource_id!r}")
        self.kind = kind


class Gone(Exception):
    """The resource is archived; its history stays readable."""

    def __init__(self, kind: str, resource_id: str) -> None:
        super().__init__(f"{kind} {resource_id!r} is archived; its history stays at /{kind}s/{resource_id}/events")
        self.kind = kind


class PersonaDataErased(Exception):
    """The persona's personal data was crypto-shredded: its knowledge and conversations are gone."""

    def __init__(self, persona_id: str) -> None:
        super().__init__(f"persona {persona_id!r} was erased: its knowledge and conversations are gone")


class Forbidden(Exception):
    """The caller may see the resource but not change it (another owner's public layer)."""


class Unauthorized(Exception):
    """The caller's key is unknown or was revoked (a long-lived MCP session checks it on every call)."""


class InvalidRequest(ValueError):
    """Input the service cannot read at all (a cursor it did not issue, a malformed part)."""
