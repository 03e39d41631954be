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
from litestar import Request, Response
from litestar.status_codes import HTTP_200_OK
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
    return Response(body, status_code=status_code, headers={"ETag": etag(version), **(headers or {})})


def visible_row(
    services: Services, table: sa.Table, key: str, resource_id: str, caller: Caller, kind: str,
    *, archived_column: str | None = "archived", public_column: str | None = None, connection: Connection | None = None,
) -> dict[str, Any]:
    """The row, if the caller may see it: another owner's private resource is simply not found."""
    if connection is None:
        with services.database.read() as own:
            row = get_row(own, table, key, resource_id)
    else:
        row = get_row(connection, table, key, resource_id)
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
