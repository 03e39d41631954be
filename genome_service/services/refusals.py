"""What a refused operation says to any front door: an HTTP-like status, the rule, the detail.

The REST API answers it as problem+json and the MCP server as a tool error; both name the same
rule. A refusal raised outside this layer (chat's ``ChatRefused``, its engine being unavailable)
carries its own ``status`` and ``rule``.
"""

from __future__ import annotations

import msgspec

from genome_service.domain.common import DomainError
from genome_service.services.errors import (
    ConcurrencyConflict,
    DatabaseUnavailable,
    Forbidden,
    Gone,
    IdempotencyKeyReused,
    InvalidRequest,
    NotFound,
    PersonaDataErased,
    SubjectErased,
    Unauthorized,
    UnstorableValue,
)
from genome_service.services.handler import IdempotencyKeyMismatch
from genome_service.services.indexes import SearchRefused
from inference.lora.adapter import AdapterRejected
from inference.models import UnknownModel
from rag.index import VectorError

# Rules that mean "the resource is in a state that forbids this", not "your input is wrong".
CONFLICT_SUFFIXES = ("_exists", "_already_attached", "_archived", "_deprecated", "_finished", "_not_allowed")
# Every error type `refusal` knows, for front doors that register handlers by type.
REFUSED = (
    DomainError, NotFound, Gone, PersonaDataErased, SubjectErased, Unauthorized, Forbidden, InvalidRequest, UnstorableValue,
    DatabaseUnavailable, ConcurrencyConflict, IdempotencyKeyReused, IdempotencyKeyMismatch, AdapterRejected,
    UnknownModel, SearchRefused, VectorError,
)


class Refusal(msgspec.Struct, frozen=True):
    status: int
    rule: str
    detail: str


def _domain_status(rule: str) -> int:
    if rule.endswith("_not_found"):
        return 404
    return 409 if rule.endswith(CONFLICT_SUFFIXES) else 422


def refusal(error: BaseException) -> Refusal | None:
    """The refusal ``error`` stands for, or None for an error no rule explains (a bug)."""
    match error:
        case DomainError():
            return Refusal(_domain_status(error.rule), error.rule, error.message)
        case NotFound():
            return Refusal(404, f"{error.kind}_not_found", str(error))
        case Gone():
            return Refusal(410, f"{error.kind}_archived", str(error))
        # SubjectErased: a write racing an erasure, the persona's key is gone.
        case PersonaDataErased() | SubjectErased():
            return Refusal(410, "persona_erased", str(error))
        case Unauthorized():
            return Refusal(401, "unauthorized", str(error))
        case Forbidden():
            return Refusal(403, "forbidden", str(error))
        case InvalidRequest():
            return Refusal(400, "bad_request", str(error))
        case UnstorableValue():
            return Refusal(400, "invalid_text", str(error))
        case DatabaseUnavailable():
            return Refusal(503, "database_unavailable", "the database did not answer; try again")
        case ConcurrencyConflict():
            return Refusal(409, "concurrent_change", str(error))
        case IdempotencyKeyReused():
            return Refusal(422, "idempotency_key_reused", str(error))
        case IdempotencyKeyMismatch():
            return Refusal(422, "idempotency_key_mismatch", str(error))
        case AdapterRejected():
            return Refusal(422, error.reason, str(error))
        case UnknownModel():
            return Refusal(422, "unknown_base_model", str(error))
        case SearchRefused() | VectorError():
            return Refusal(422, error.rule, str(error))
    rule, status = getattr(error, "rule", None), getattr(error, "status", None)
    return Refusal(status, rule, str(error)) if isinstance(rule, str) and isinstance(status, int) else None
