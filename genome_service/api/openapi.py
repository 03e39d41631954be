"""Documents the API's conventions on every operation of the generated OpenAPI schema.

Litestar documents each handler's success and a generic 400; the conventions
every route shares (problem+json errors, If-Match, Idempotency-Key, ETag, bearer
keys, refused unknown fields) are added here once instead of on every handler,
and each error response lists the rules it may name (`x-rules`, from `documented_rules`).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

import msgspec
from litestar.openapi.spec import (
    Components,
    OpenAPI,
    OpenAPIHeader,
    OpenAPIMediaType,
    OpenAPIResponse,
    OpenAPIType,
    Parameter,
    Reference,
    Schema,
    SecurityScheme,
)

from genome_service.api.auth import PUBLIC_PATHS
from genome_service.api.conventions import MAX_IDEMPOTENCY_KEY
from genome_service.api.documented_rules import rules_of

SSE = "text/event-stream"
_PROBLEM = Reference(ref="#/components/schemas/ProblemDetails")
_STRING = Schema(type=OpenAPIType.STRING)
_IDEMPOTENCY_KEY = Schema(type=OpenAPIType.STRING, min_length=1, max_length=MAX_IDEMPOTENCY_KEY)
_ETAG = OpenAPIHeader(schema=_STRING, description='The stream version, e.g. "3"; send it back as If-Match.')
_READ_ERRORS = {400: "Malformed request", 401: "Missing, unknown or revoked API key", 404: "No such resource visible to the caller",
                410: "Archived", 429: "Rate limited (see Retry-After)", 503: "The database does not answer"}
_WRITE_ERRORS = _READ_ERRORS | {403: "Only the owner may change it", 409: "The resource's state forbids it",
                                412: "If-Match names a stale version", 413: "Body too large",
                                415: "Wrong content type", 422: "A domain rule or the adapter refused it"}
_SEARCH_ERRORS = {422: "Empty query text, k out of range, or a vector of the wrong dimension, not finite or zero"}


@dataclass
class RuledResponse(OpenAPIResponse):
    """An error response that lists, as `x-rules`, every `rule` its problem details may name."""

    rules: list[str] | None = field(default=None, metadata={"alias": "x-rules"})


def document_conventions(schema: OpenAPI, request_types: Iterable[type[msgspec.Struct]]) -> None:
    components = schema.components if isinstance(schema.components, Components) else Components()
    schema.components = components
    components.schemas = dict(components.schemas or {})
    components.schemas["ProblemDetails"] = Schema(
        type=OpenAPIType.OBJECT,
        description="RFC 9457 problem details; `rule` names the rule or check that failed.",
        required=["status", "type", "title", "detail", "rule"],
        properties={"status": Schema(type=OpenAPIType.INTEGER), "type": _STRING, "title": _STRING, "detail": _STRING, "rule": _STRING},
    )
    components.security_schemes = {"apiKey": SecurityScheme(type="http", scheme="bearer", description="gsk_... from `genome-service keys create`")}
    for struct in request_types:
        if struct.__struct_config__.forbid_unknown_fields and struct.__name__ in components.schemas:
            component = components.schemas[struct.__name__]
            if isinstance(component, Schema):
                component.additional_properties = False
    for path, item in (schema.paths or {}).items():
        for method in ("get", "post", "put", "patch", "delete"):
            operation = getattr(item, method)
            if operation is None or any(path.startswith(p) for p in PUBLIC_PATHS):
                continue
            operation.security = [{"apiKey": []}]
            errors = _READ_ERRORS if method == "get" else _WRITE_ERRORS
            if path.endswith("/search"):
                errors = errors | _SEARCH_ERRORS
            responses = dict(operation.responses or {})
            rules = rules_of(operation.operation_id or "", re.findall(r"{(\w+)}", path), write=method != "get")
            for status, description in errors.items():
                responses[str(status)] = RuledResponse(
                    description=description, content={"application/problem+json": OpenAPIMediaType(schema=_PROBLEM)},
                    rules=rules.get(status, []),
                )
            # A single resource, or a write that returns one, carries its version.
            if path.endswith("}") or method != "get":
                for status in ("200", "201"):
                    if isinstance(response := responses.get(status), OpenAPIResponse):
                        response.headers = {**(response.headers or {}), "ETag": _ETAG}
            operation.responses = responses
            parameters = list(operation.parameters or [])
            if method in ("put", "patch", "delete"):
                parameters.append(_header("If-Match", _STRING, 'Apply only if the resource is still at this version (an ETag, e.g. "3"); else 412.'))
            if method == "post":
                parameters.append(_header("Idempotency-Key", _IDEMPOTENCY_KEY, "A retry with the same key answers with the first response and changes nothing; the same key with another method, path, query or body gets 422."))
            operation.parameters = parameters


def _header(name: str, schema: Schema, description: str) -> Parameter:
    return Parameter(name=name, param_in="header", required=False, schema=schema, description=description)  # type: ignore[arg-type]


def document_json_or_sse(schema: OpenAPI, path: str, method: str, description: str) -> None:
    """An answer that is JSON, or server-sent events when asked for: document both media types of its 200.

    Such a handler declares the stream's media type (Litestar lets a handler's type override a
    Stream's own, while a plain Response keeps the JSON type it is given), so its schema lands there.
    """
    operation = getattr((schema.paths or {})[path], method)
    assert operation is not None and operation.responses is not None
    answer = operation.responses["200"]
    assert isinstance(answer, OpenAPIResponse) and answer.content is not None
    json_body = answer.content.pop(SSE)
    answer.content = {"application/json": json_body, SSE: OpenAPIMediaType(schema=Schema(description=description))}
    answer.headers = None  # an answer, not a resource version: no ETag
