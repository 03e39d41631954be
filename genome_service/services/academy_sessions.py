"""Academy sessions: start one for a persona, follow it (its history, or live), cancel it.

Sessions are run by academy workers (`genome-service academy worker`, or the server's own
thread); this service only appends commands and reads. Whether a session may still change
is the aggregate's rule, decided on the stream's current version: two cancels racing each
other cannot both pass.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime

import msgspec
import sqlalchemy as sa

from genome_service.domain.academy import (
    ACADEMY_SESSION,
    TERMINAL,
    ChangeSessionStatus,
    SessionStatus,
    StartAcademySession,
    TrainingData,
    TrainingProgressed,
)
from genome_service.domain.common import DomainError
from genome_service.domain.persona import PERSONA
from genome_service.eventstore.records import EventMetadata
from genome_service.projections.queries import Row, get_row
from genome_service.projections.tables import ACADEMY_SESSIONS
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.training_files import TrainingFiles
from genome_service.services.reads import EventView, Page, Visibility, event_views, follow_stream, page, visible_row

VISIBILITY = Visibility(ACADEMY_SESSIONS, "session_id", "academy_session", archived=None)


class Session(msgspec.Struct, frozen=True):
    id: str
    owner: str
    persona_id: str
    goal: str
    target_similarity: float
    budget_steps: int
    budget_seconds: float
    status: str
    reason: str
    planned: bool
    challenge_count: int
    example_count: int
    step: int
    loss: float | None
    layer_ids: list[str]
    version: int
    created_at: datetime
    updated_at: datetime


def _from_row(row: Row) -> Session:
    fields = {k: v for k, v in row.items() if k != "session_id"}
    return msgspec.convert({**fields, "id": row["session_id"], "layer_ids": list(row["layer_ids"])}, Session)


def start_session(
    services: Services, persona_id: str, goal: str, *, owner: str | None = None, budget_steps: int = 100,
    budget_seconds: float = 3600.0, target_similarity: float = 0.95, metadata: EventMetadata | None = None,
    needs: tuple[str, ...] = (), data: TrainingData | None = None,
) -> str:
    """A new pending session for a persona `owner` may see (any persona when owner is None: the CLI).

    A persona without a genome is refused here: the session's layer would have nowhere to go.
    Training files named in `data` must be the persona owner's.
    """
    persona = services.repository.load(PERSONA, persona_id).state
    if persona is None or persona.archived or (owner is not None and persona.owner != owner):
        raise DomainError("persona_not_found", f"persona {persona_id!r} does not exist")
    data = data or TrainingData()

    def command(session_id: str) -> StartAcademySession:
        return StartAcademySession(session_id, persona.owner, persona_id, goal, target_similarity,
                                   budget_steps, budget_seconds, needs, data)

    ACADEMY_SESSION.decide(command("validation"), None)  # the ask's own faults first
    require_files(services, persona.owner, data)
    if persona.genome_id is None:
        raise DomainError("persona_has_no_genome", (
            f"persona {persona_id!r} has no genome to train a layer for: create it with a base_model, "
            "or create a genome and assign it (PUT /personas/{id}/genome)"
        ))

    outcome = create_stream(services, ACADEMY_SESSION, metadata or EventMetadata(actor=owner or "cli"), command)
    return outcome.aggregate.stream_id


def require_files(services: Services, owner: str, data: TrainingData) -> None:
    """The session's training files exist and are the owner's (`file_not_found` otherwise)."""
    for file_id in (data.training_file_id, data.validation_file_id):
        if file_id is not None:
            TrainingFiles(services).get(Caller(owner), file_id)


def loss_curve(services: Services, session_id: str) -> list[tuple[int, float]]:
    """(step, loss) of every recorded training step, in order (steps restart at each task)."""
    return [(e.event.step, e.event.loss) for e in services.store.read_stream(session_id)
            if isinstance(e.event, TrainingProgressed)]


class AcademySessions:
    def __init__(self, services: Services) -> None:
        self.services = services

    # Reads
    def visible(self, caller: Caller, session_id: str) -> Row:
        return visible_row(self.services, VISIBILITY, session_id, caller)

    def get(self, caller: Caller, session_id: str) -> Session:
        """One session: status, plan, counts, training step and loss, layers produced."""
        return _from_row(self.visible(caller, session_id))

    def list(self, caller: Caller, *, status: SessionStatus | None = None, limit: int = 50, cursor: str | None = None) -> Page:
        """The caller's sessions, oldest first, a page at a time."""
        where = [ACADEMY_SESSIONS.c.owner == caller.owner]
        if status is not None:
            where.append(ACADEMY_SESSIONS.c.status == status.value)
        rows, next_cursor = page(self.services, ACADEMY_SESSIONS, "session_id", where, cursor, limit)
        return Page([_from_row(row) for row in rows], next_cursor)

    def status(self, session_id: str) -> SessionStatus | None:
        """The session's status in the read model: one indexed row, and another process's change
        reaches it through that process's inline projection (what a worker polls to stop)."""
        with self.services.database.read() as connection:
            row = get_row(connection, ACADEMY_SESSIONS, "session_id", session_id)
        return None if row is None else SessionStatus(row["status"])

    def waiting(self) -> list[str]:
        """Sessions that need a worker (pending, or running on one that may have died), oldest first."""
        active = (SessionStatus.PENDING.value, SessionStatus.RUNNING.value)
        query = (sa.select(ACADEMY_SESSIONS.c.session_id).where(ACADEMY_SESSIONS.c.status.in_(active))
                 .order_by(ACADEMY_SESSIONS.c.created_at))
        with self.services.database.read() as connection:
            return list(connection.execute(query).scalars())

    def history(self, caller: Caller, session_id: str) -> list[EventView]:
        """The session's events so far, oldest first."""
        self.visible(caller, session_id)
        return event_views(self.services.store.read_stream(session_id))

    def follow(self, caller: Caller, session_id: str) -> AsyncIterator[EventView]:
        """Every event, history first, then live ones as they are appended, until the session ends."""
        self.visible(caller, session_id)

        def ended() -> bool:
            state = self.services.repository.load(ACADEMY_SESSION, session_id).state
            return state is not None and state.status in TERMINAL

        return follow_stream(self.services, session_id, ended)

    # Commands
    def start(
        self, command: Command, persona_id: str, goal: str, *, target_similarity: float = 0.95, budget_steps: int = 100,
        budget_seconds: float = 3600.0, needs: tuple[str, ...] = (), data: TrainingData | None = None,
    ) -> Session:
        """Start a session for one of the caller's personas (one with a genome); a worker picks it up.
        With ``needs``, its plan has one task for each of them instead of the goal's sentences;
        ``data`` names what it trains on (default: the challenge loop) and whether it attaches only if improved."""
        session_id = start_session(
            self.services, persona_id, goal, owner=command.owner, budget_steps=budget_steps,
            budget_seconds=budget_seconds, target_similarity=target_similarity, metadata=command.metadata,
            needs=needs, data=data,
        )
        return self.get(command.caller, session_id)

    def cancel(self, command: Command, session_id: str) -> Session:
        """Cancel a pending or running session (its worker stops within seconds); a finished one
        (cancelled included) is refused by the aggregate: ``session_finished``."""
        self.visible(command.caller, session_id)
        self.services.commands.execute(
            ACADEMY_SESSION, session_id, ChangeSessionStatus(SessionStatus.CANCELLED, f"cancelled by {command.owner}"),
            expected_version=command.expected_version, metadata=command.metadata,
        )
        return self.get(command.caller, session_id)
