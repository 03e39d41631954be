"""Reads every feature service shares: who may see a row, pages of rows, a stream's history.

A private resource of another owner is simply not found, never "forbidden": a caller
learns nothing about what it may not see. Lists are keyset pages in (created_at, id)
order, so a page never repeats or skips a row that was there when the first was read.
"""

from __future__ import annotations

import asyncio
import base64
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import datetime
from typing import Any, NamedTuple

import msgspec
import sqlalchemy as sa

from genome_service.eventstore.records import RecordedEvent
from genome_service.projections.columns import utc
from genome_service.projections.queries import Row, get_row, list_rows
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller
from genome_service.services.errors import Gone, InvalidRequest, NotFound

MAX_PAGE = 200
FOLLOW_POLL_SECONDS = 0.25


class EventView(msgspec.Struct, frozen=True):
    position: int
    version: int
    type: str
    data: dict[str, Any]
    actor: str | None
    recorded_at: datetime


def event_views(events: Sequence[RecordedEvent]) -> list[EventView]:
    return [
        EventView(position=e.position, version=e.version, type=e.type, data=msgspec.to_builtins(e.event),
                  actor=e.metadata.actor, recorded_at=e.recorded_at)
        for e in events
    ]


async def follow_stream(services: Services, stream_id: str, ended: Callable[[], bool]) -> AsyncIterator[EventView]:
    """Every event of a process's stream, history first, then live ones as they are appended,
    until ``ended`` (read after each batch, off the event loop) says it is over."""
    version, store = 0, services.store
    while True:
        batch = await asyncio.to_thread(store.read_stream, stream_id, after_version=version)
        for view in event_views(batch):
            yield view
            version = view.version
        # Ends only once the final status is sent: nothing follows a finished process.
        if await asyncio.to_thread(ended) and store.stream_version(stream_id) == version:
            return
        await asyncio.sleep(FOLLOW_POLL_SECONDS)


class Page(msgspec.Struct, frozen=True):
    items: list[Any]
    next_cursor: str | None


class Cursor(msgspec.Struct, array_like=True, frozen=True):
    """Keyset position: the (created_at, id) of the last item of the previous page."""

    created_at: datetime
    id: str

    def encode(self) -> str:
        return base64.urlsafe_b64encode(msgspec.json.encode(self)).decode().rstrip("=")

    @classmethod
    def decode(cls, token: str) -> Cursor:
        try:
            return msgspec.json.decode(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)), type=cls)
        except (ValueError, msgspec.DecodeError) as exc:
            raise InvalidRequest(f"cursor {token[:40]!r} is not one this service issued") from exc


class Visibility(NamedTuple):
    """How one kind of resource is seen: its table, key column, name in errors, and which
    columns mark it archived (410) and public (readable by every owner)."""

    table: sa.Table
    key: str
    kind: str
    archived: str | None = "archived"
    public: str | None = None


def visible_row(services: Services, rule: Visibility, resource_id: str, caller: Caller) -> Row:
    """The row, if the caller may see it; cached until the next commit anywhere (SQLite)."""
    row = services.database.read_through((rule.table.name, resource_id), lambda c: get_row(c, rule.table, rule.key, resource_id))
    return visible(row, rule, resource_id, caller)


def visible(row: Row | None, rule: Visibility, resource_id: str, caller: Caller) -> Row:
    """``visible_row``'s rule for a row already read."""
    if row is None or (row["owner"] != caller.owner and not (rule.public and row[rule.public])):
        raise NotFound(rule.kind, resource_id)
    if rule.archived and row[rule.archived]:
        raise Gone(rule.kind, resource_id)
    return row


def page(
    services: Services, table: sa.Table, key: str, where: list[sa.ColumnElement[bool]], cursor: str | None, limit: int,
) -> tuple[list[Row], str | None]:
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
