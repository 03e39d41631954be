"""One place that turns the service's errors into RFC 9457 problem details."""

from __future__ import annotations

import logging
from typing import Any

from litestar import Request, Response
from litestar.exceptions import HTTPException
from litestar.plugins.problem_details import (
    ProblemDetailsConfig,
    ProblemDetailsException,
    ProblemDetailsPlugin,
)
from litestar.status_codes import (
    HTTP_400_BAD_REQUEST,
    HTTP_409_CONFLICT,
    HTTP_412_PRECONDITION_FAILED,
    HTTP_500_INTERNAL_SERVER_ERROR,
)

from genome_service.academy.datasets import DatasetRejected
from genome_service.chat.runtime import ChatUnavailable
from genome_service.chat.turn import ChatRefused
from genome_service.services.errors import ConcurrencyConflict, DatabaseUnavailable
from genome_service.services.refusals import REFUSED, refusal
from inference.daemon.client import DaemonRefused

log = logging.getLogger("genome_service.api")
PROBLEM_BASE = "https://genome-service.dev/problems/"


def problem(status: int, rule: str, detail: str, **extra: Any) -> ProblemDetailsException:
    return ProblemDetailsException(
        status_code=status, type_=PROBLEM_BASE + rule, title=rule.replace("_", " "), detail=detail,
        extra={"rule": rule, **extra},
    )


def _refused(exc: Exception) -> ProblemDetailsException:
    found = refusal(exc)
    assert found is not None, f"{type(exc).__name__} is registered as a refusal"
    return problem(found.status, found.rule, found.detail)


def _dataset_rejected(exc: DatasetRejected) -> ProblemDetailsException:
    """A training file refused: the rule, and the first line that broke it (0: the file as a whole)."""
    return problem(413 if exc.rule == "file_too_large" else 422, exc.rule, exc.message, line=exc.line)


def _conflict(request: Request[Any, Any, Any], exc: ConcurrencyConflict) -> Response[Any]:
    # A stale If-Match is the client's precondition failing; otherwise a writer raced us.
    if "if-match" in request.headers:
        error = problem(HTTP_412_PRECONDITION_FAILED, "stale_version", str(exc), current_version=exc.actual)
    else:
        error = problem(HTTP_409_CONFLICT, "concurrent_change", str(exc), current_version=exc.actual)
    return error.to_response(request)


def _http(exc: HTTPException) -> ProblemDetailsException:
    rule = {400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
            413: "payload_too_large", 415: "unsupported_media_type", 429: "rate_limited", 503: "unavailable"}.get(exc.status_code, "error")
    extra = exc.extra if isinstance(exc.extra, dict) else {"errors": exc.extra} if exc.extra else {}
    headers = dict(exc.headers or {})
    if exc.status_code == 429 and "RateLimit-Reset" in headers:
        headers["Retry-After"] = headers["RateLimit-Reset"]
    return ProblemDetailsException(
        status_code=exc.status_code, type_=PROBLEM_BASE + rule, title=rule.replace("_", " "),
        detail=exc.detail, headers=headers, extra={"rule": rule, **extra},
    )


def problem_details_plugin() -> ProblemDetailsPlugin:
    return ProblemDetailsPlugin(
        ProblemDetailsConfig(
            exception_to_problem_detail_map={
                HTTPException: _http,
                DatasetRejected: _dataset_rejected,
                # These have handlers of their own below (If-Match, Retry-After).
                **dict.fromkeys({*REFUSED, ChatRefused, ChatUnavailable, DaemonRefused} - set(EXCEPTION_HANDLERS), _refused),
            }
        )
    )


# Seconds a client should wait before retrying while the database cannot be reached.
DATABASE_RETRY_AFTER_SECONDS = 1


def _database_down(request: Request[Any, Any, Any], exc: DatabaseUnavailable) -> Response[Any]:
    log.error("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    response = _refused(exc).to_response(request)
    response.headers["Retry-After"] = str(DATABASE_RETRY_AFTER_SECONDS)
    return response


def _not_utf8(request: Request[Any, Any, Any], exc: UnicodeDecodeError) -> Response[Any]:
    # Non-UTF-8 bytes in a multipart text part: Litestar decodes it before any handler runs.
    detail = "a multipart part without a filename must be UTF-8 text; send adapter files with a filename"
    return problem(HTTP_400_BAD_REQUEST, "invalid_text", detail).to_response(request)


def _unexpected(request: Request[Any, Any, Any], exc: Exception) -> Response[Any]:
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return problem(HTTP_500_INTERNAL_SERVER_ERROR, "internal_error", "the service failed; the error is logged").to_response(request)


EXCEPTION_HANDLERS = {
    ConcurrencyConflict: _conflict,
    DatabaseUnavailable: _database_down,
    UnicodeDecodeError: _not_utf8,
    Exception: _unexpected,
}
