"""Helpers every resource controller shares: visibility, ETag responses, event views, pages.

Handlers whose work is a few short queries run on the event loop
(``sync_to_thread=False``): a thread hop costs more CPU (GIL handoffs around each
call) than the queries block, and writes queue on one writer connection anyway.
Only adapter uploads and downloads, which move large files, go to a thread.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, TypeVar

import msgspec
import sqlalchemy as sa
from litestar import MediaType, Request, Response
from litestar.serialization import encode_json, get_serializer
from litestar.status_codes import HTTP_200_OK
from litestar.types import ASGIApp, Receive, Scope, Send
from sqlalchemy.engine import Connection

from genome_service.api.auth import Caller
from genome_service.api.conventions import Cursor, etag
from genome_service.api.errors import Gone, NotFound
from genome_service.eventstore.records import RecordedEvent
from genome_service.projections.columns import utc
from genome_service.projections.queries import get_row, list_rows
from genome_service.services.bootstrap import Services

T = TypeVar("T")
MAX_PAGE = 200


class EventView(msgspec.Struct, frozen=True):
    position: int
    version: int
    type: str
    data: dict[str, Any]
    actor: str | None
    recorded_at: datetime


def event_views(events: list[RecordedEvent]) -> list[EventView]:
    return [
        EventView(e.position, e.version, e.type, msgspec.to_builtins(e.event), e.metadata.actor, e.recorded_at)
        for e in events
    ]


def with_etag(body: T, version: int, status_code: int = HTTP_200_OK, headers: dict[str, str] | None = None) -> Response[T]:
    return VersionedResponse(body, status_code=status_code, headers={"ETag": etag(version), **(headers or {})})


class VersionedResponse(Response[T]):
    """A resource as JSON with its headers, encoded straight into the two ASGI messages.

    Litestar's general path (header objects, merging, media-type checks) cost a GET by id
    about as much as its query; anything it would add here (route headers or cookies,
    background tasks, another media type, HEAD) takes that path still.
    """

    def to_asgi_response(  # type: ignore[override]
        self, app: Any, request: Request[Any, Any, Any], *, background: Any = None, cookies: Any = None,
        headers: dict[str, str] | None = None, is_head_response: bool = False, media_type: Any = None,
        status_code: int | None = None, **rest: Any,
    ) -> ASGIApp:
        kind = self.media_type or media_type or MediaType.JSON
        if headers or cookies or background or self.cookies or self.background or is_head_response or rest.get("encoded_headers") or kind != MediaType.JSON:
            return super().to_asgi_response(
                app, request, background=background, cookies=cookies, headers=headers, is_head_response=is_head_response,
                media_type=media_type, status_code=status_code, **rest,
            )
        body = encode_json(self.content, get_serializer(rest.get("type_encoders") or self.response_type_encoders))
        fields = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        fields += [(name.lower().encode("latin-1"), value.encode("latin-1")) for name, value in self.headers.items()]
        return _Encoded(self.status_code or status_code or HTTP_200_OK, fields, body)


class _Encoded:
    __slots__ = ("body", "headers", "status")

    def __init__(self, status: int, headers: list[tuple[bytes, bytes]], body: bytes) -> None:
        self.status, self.headers, self.body = status, headers, body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await send({"type": "http.response.start", "status": self.status, "headers": self.headers})
        await send({"type": "http.response.body", "body": self.body, "more_body": False})


def visible_row(
    services: Services, table: sa.Table, key: str, resource_id: str, caller: Caller, kind: str,
    *, archived_column: str | None = "archived", public_column: str | None = None, connection: Connection | None = None,
) -> dict[str, Any]:
    """The row, if the caller may see it: another owner's private resource is simply not found."""
    if connection is None:
        # Shared with later requests until the next commit: the row is only read here and by callers.
        row = services.database.read_through((table.name, resource_id), lambda own: get_row(own, table, key, resource_id))
    else:
        row = get_row(connection, table, key, resource_id)
    return visible(row, resource_id, caller, kind, archived_column=archived_column, public_column=public_column)


def visible(
    row: dict[str, Any] | None, resource_id: str, caller: Caller, kind: str,
    *, archived_column: str | None = "archived", public_column: str | None = None,
) -> dict[str, Any]:
    """``visible_row``'s rule for a row already read."""
    if row is None or (row["owner"] != caller.owner and not (public_column and row[public_column])):
        raise NotFound(kind, resource_id)
    if archived_column and row[archived_column]:
        raise Gone(kind, resource_id)
    return row


def page(
    services: Services, table: sa.Table, key: str, where: list[sa.ColumnElement[bool]], cursor: str | None, limit: int,
) -> tuple[list[dict[str, Any]], str | None]:
    """One page of rows in (created_at, id) order, and the cursor of the next page if there is one."""
    after = None
    if cursor is not None:
        decoded = Cursor.decode(cursor)
        after = (decoded.created_at, decoded.id)
    with services.database.read() as connection:
        rows, more = list_rows(connection, table, key, where, after=after, limit=limit)
    for row in rows:
        row["created_at"], row["updated_at"] = utc(row["created_at"]), utc(row["updated_at"])
    return rows, Cursor(rows[-1]["created_at"], rows[-1][key]).encode() if more else None


def caller_of(request: Request[Any, Any, Any]) -> Caller:
    return request.user  # type: ignore[no-any-return]
