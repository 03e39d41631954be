"""Conversations: a persona's recorded chats with one owner, their messages sealed with its data key."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import msgspec

from genome_service.domain.common import DomainError
from genome_service.domain.conversation import CONVERSATION, Generation, Message, MessageAdded
from genome_service.projections.columns import utc
from genome_service.projections.queries import child_rows, get_row
from genome_service.projections.sealed_columns import open_value
from genome_service.projections.tables import CONVERSATION_MESSAGES, CONVERSATIONS
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, EventMetadata
from genome_service.services.personas import Personas
from genome_service.services.reads import Page, Visibility, page, visible

VISIBILITY = Visibility(CONVERSATIONS, "conversation_id", "conversation", archived=None)


class ConversationSummary(msgspec.Struct, frozen=True):
    id: str
    persona_id: str
    message_count: int
    version: int
    created_at: datetime
    updated_at: datetime


class ConversationDetail(msgspec.Struct, frozen=True):
    id: str
    persona_id: str
    messages: list[Message]
    version: int
    created_at: datetime
    updated_at: datetime


def _generation(stored: str | dict[str, Any] | None) -> Generation | None:
    # Read on the driver: SQLite hands back JSON text, psycopg a decoded object.
    if isinstance(stored, str):
        return msgspec.json.decode(stored, type=Generation | None)
    return msgspec.convert(stored, Generation | None)


class Conversations:
    def __init__(self, services: Services) -> None:
        self.services = services

    def list(self, caller: Caller, persona_id: str, *, limit: int = 50, cursor: str | None = None) -> Page:
        """The caller's conversations with the persona, oldest first; an archived persona's stay
        readable, an erased one's are gone (410)."""
        Personas(self.services).readable(caller, persona_id)
        where = [CONVERSATIONS.c.owner == caller.owner, CONVERSATIONS.c.persona_id == persona_id]
        rows, next_cursor = page(self.services, CONVERSATIONS, "conversation_id", where, cursor, limit)
        return Page([
            ConversationSummary(id=r["conversation_id"], persona_id=r["persona_id"], message_count=r["message_count"],
                                version=r["version"], created_at=r["created_at"], updated_at=r["updated_at"])
            for r in rows
        ], next_cursor)

    def get(self, caller: Caller, conversation_id: str) -> ConversationDetail:
        """One conversation and every message, with how each reply was generated."""
        with self.services.database.read() as connection:
            row = visible(get_row(connection, CONVERSATIONS, "conversation_id", conversation_id), VISIBILITY, conversation_id, caller)
            messages = child_rows(connection, CONVERSATION_MESSAGES, "conversation_id", [conversation_id], "ordinal")
            key = self.services.data_keys.for_reading(connection, [row["persona_id"]])[row["persona_id"]]
        return ConversationDetail(
            id=conversation_id, persona_id=row["persona_id"],
            messages=[Message(m["role"], open_value(key, CONVERSATION_MESSAGES, m, "content") or "", _generation(m["generation"]))
                      for m in messages],
            version=row["version"], created_at=utc(row["created_at"]), updated_at=utc(row["updated_at"]),
        )

    def recorded_reply(self, metadata: EventMetadata) -> tuple[str, Message] | None:
        """(conversation id, reply) of the turn a request with this idempotency key already
        recorded, if any: a recipe's chat step taken up again after a crash answers with it
        instead of chatting a second time."""
        key = metadata.idempotency_key
        prior = self.services.store.find_idempotent(key) if key is not None else None
        if prior is None:
            return None
        replies = [e.event for e in prior.events if isinstance(e.event, MessageAdded) and e.event.role == "assistant"]
        if not replies:
            return None
        return prior.stream_id, Message(replies[-1].role, replies[-1].content, replies[-1].generation)

    def history(self, owner: str, persona_id: str, conversation_id: str) -> tuple[Message, ...]:
        """The messages so far of one of the owner's conversations with the persona, to continue it."""
        state = self.services.repository.load(CONVERSATION, conversation_id).state
        if state is None or state.owner != owner or state.persona_id != persona_id:
            raise DomainError("conversation_not_found", f"conversation {conversation_id!r} does not exist")
        return state.messages
