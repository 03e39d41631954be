"""Academy sessions: start one for a persona, follow it (JSON history or live SSE), cancel it.

Sessions are run by academy workers (`genome-service academy worker`, or the server's own
thread on SQLite by default: `GENOME_ACADEMY_WORKER`); this controller only appends and reads.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPI
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import ServerSentEvent, ServerSentEventMessage
from litestar.status_codes import HTTP_201_CREATED

from genome_service.academy.sessions import start_session
from genome_service.academy.shared_engine import SharedEngine
from genome_service.api.conventions import Page, command_metadata, expected_version
from genome_service.api.openapi import SSE, document_json_or_sse
from genome_service.api.resources import MAX_PAGE, EventView, caller_of, event_views, page, visible_row, with_etag
from genome_service.domain.academy import (
    ACADEMY_SESSION,
    MAX_BUDGET_SECONDS,
    MAX_BUDGET_STEPS,
    TERMINAL,
    ChangeSessionStatus,
    Difficulty,
    SessionStatus,
)
from genome_service.domain.common import DomainError
from genome_service.domain.layer import TraitType
from genome_service.projections.tables import AcademySessionRow
from genome_service.services.bootstrap import Services

TABLE = AcademySessionRow.__table__  # type: ignore[attr-defined]
FOLLOW_POLL_SECONDS = 0.25


class SessionCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    persona_id: str
    goal: str
    target_similarity: float = 0.95
    budget_steps: Annotated[int, msgspec.Meta(ge=1, le=MAX_BUDGET_STEPS)] = 100
    budget_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_BUDGET_SECONDS)] = 3600.0


class ChallengeCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    trait_type: TraitType
    difficulty: Difficulty = Difficulty.INTERMEDIATE


class ResponseCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    response: str


class ChallengeView(msgspec.Struct, frozen=True):
    id: str
    trait_type: TraitType
    difficulty: Difficulty
    prompt: str
    criteria: list[str]


class Score(msgspec.Struct, frozen=True):
    challenge_id: str
    score: float  # 0..100
    rationale: str
    judge: str  # "model", or "heuristic" when the model's verdicts stayed malformed


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


def _from_row(row: dict[str, Any]) -> Session:
    return Session(
        row["session_id"], row["owner"], row["persona_id"], row["goal"], row["target_similarity"],
        row["budget_steps"], row["budget_seconds"], row["status"], row["reason"], row["planned"],
        row["challenge_count"], row["example_count"], row["step"], row["loss"], list(row["layer_ids"]),
        row["version"], row["created_at"], row["updated_at"],
    )


class AcademyController(Controller):
    path = "/academy/sessions"
    tags = ["academy"]

    @post("/", operation_id="startAcademySession", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def create(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], data: JSONBody[SessionCreate],
    ) -> Response[Session]:
        """Start a session for one of the caller's personas; a worker picks it up."""
        owner = caller_of(request).owner
        session_id = start_session(
            services, data.persona_id, data.goal, owner=owner, budget_steps=data.budget_steps,
            budget_seconds=data.budget_seconds, target_similarity=data.target_similarity,
            metadata=command_metadata(request, owner, services.data_keys),
        )
        session = self._session(request, services, session_id)
        return with_etag(session, session.version, HTTP_201_CREATED, {"Location": f"/academy/sessions/{session.id}"})

    @get("/{session_id:str}", operation_id="getAcademySession", sync_to_thread=False)
    def read(self, request: Request[Any, Any, Any], services: NamedDependency[Services], session_id: FromPath[str]) -> Response[Session]:
        """One session: status, plan, counts, training step and loss, layers produced."""
        session = self._session(request, services, session_id)
        return with_etag(session, session.version)

    @get("/", operation_id="listAcademySessions", sync_to_thread=False)
    def list(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
        status: FromQuery[SessionStatus | None] = None,
    ) -> Page:
        """The caller's sessions, oldest first, a page at a time."""
        where = [TABLE.c.owner == caller_of(request).owner]
        if status is not None:
            where.append(TABLE.c.status == status.value)
        rows, next_cursor = page(services, TABLE, "session_id", where, cursor, limit)
        return Page([_from_row(row) for row in rows], next_cursor)

    @post("/{session_id:str}/cancel", operation_id="cancelAcademySession", status_code=200, sync_to_thread=False)
    def cancel(self, request: Request[Any, Any, Any], services: NamedDependency[Services], session_id: FromPath[str]) -> Response[Session]:
        """Cancel a pending or running session (its worker stops within seconds); 409 once finished."""
        owner = caller_of(request).owner
        row = visible_row(services, TABLE, "session_id", session_id, caller_of(request), "academy_session",
                          archived_column=None)
        # Cancelled included: cancelling twice is a mistake worth saying, not a silent no-op.
        if row["status"] in {status.value for status in TERMINAL}:
            raise DomainError("session_finished", f"session {session_id} is {row['status']} and can no longer change")
        services.commands.execute(
            ACADEMY_SESSION, session_id, ChangeSessionStatus(SessionStatus.CANCELLED, f"cancelled by {owner}"),
            expected_version=expected_version(request), metadata=command_metadata(request, owner, services.data_keys),
        )
        session = self._session(request, services, session_id)
        return with_etag(session, session.version)

    @post("/{session_id:str}/challenges", operation_id="createAcademyChallenge", status_code=HTTP_201_CREATED)
    async def challenge(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services],
        academy_engine: NamedDependency[SharedEngine], session_id: FromPath[str],
        data: JSONBody[ChallengeCreate],
    ) -> ChallengeView:
        """A challenge the model writes for this session's goal, of the trait type and difficulty asked."""
        owner = await asyncio.to_thread(self._owned, request, services, session_id)
        runner = await academy_engine.runner()
        made = await asyncio.to_thread(runner.add_challenge, session_id, data.trait_type, data.difficulty,
                                       command_metadata(request, owner, services.data_keys))
        return ChallengeView(made.challenge_id, made.trait_type, made.difficulty, made.prompt, list(made.criteria))

    @post("/{session_id:str}/challenges/{challenge_id:str}/responses", operation_id="scoreAcademyResponse",
          status_code=HTTP_201_CREATED)
    async def response(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services],
        academy_engine: NamedDependency[SharedEngine], session_id: FromPath[str],
        challenge_id: FromPath[str], data: JSONBody[ResponseCreate],
    ) -> Score:
        """Judge an answer to a challenge: a score 0-100 with its rationale (one response per challenge)."""
        owner = await asyncio.to_thread(self._owned, request, services, session_id)
        runner = await academy_engine.runner()
        verdict = await asyncio.to_thread(runner.score_response, session_id, challenge_id, data.response,
                                          command_metadata(request, owner, services.data_keys))
        return Score(challenge_id, verdict.score, verdict.rationale, verdict.judge)

    # The handler's media type is the stream's; the JSON answer names its own (as chat does).
    @get("/{session_id:str}/events", operation_id="academySessionEvents", media_type=SSE, sync_to_thread=False)
    def events(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], session_id: FromPath[str],
    ) -> Response[list[EventView]]:
        """The session's history as JSON; with `Accept: text/event-stream`, history then live events until it ends."""
        visible_row(services, TABLE, "session_id", session_id, caller_of(request), "academy_session",
                    archived_column=None)
        if SSE in request.headers.get("accept", ""):
            return ServerSentEvent(_follow(services, session_id))
        return Response(event_views(services.store.read_stream(session_id)), media_type=MediaType.JSON)

    def _owned(self, request: Request[Any, Any, Any], services: Services, session_id: str) -> str:
        visible_row(services, TABLE, "session_id", session_id, caller_of(request), "academy_session",
                    archived_column=None)
        return caller_of(request).owner

    def _session(self, request: Request[Any, Any, Any], services: Services, session_id: str) -> Session:
        row = visible_row(services, TABLE, "session_id", session_id, caller_of(request), "academy_session",
                          archived_column=None)
        return _from_row(row)


async def _follow(services: Services, session_id: str) -> AsyncIterator[ServerSentEventMessage]:
    """Every event as an SSE message named by its type, in order; the stream ends with the session."""
    version = 0
    while True:
        batch = await asyncio.to_thread(services.store.read_stream, session_id, after_version=version)
        for view, recorded in zip(event_views(batch), batch, strict=True):
            yield ServerSentEventMessage(msgspec.json.encode(view).decode(), event=view.type, id=str(view.version))
            version = recorded.version
        state = await asyncio.to_thread(lambda: services.repository.load(ACADEMY_SESSION, session_id).state)
        # Ends only once the final status is sent: nothing follows a finished session.
        if state is not None and state.status in TERMINAL and services.store.stream_version(session_id) == version:
            return
        await asyncio.sleep(FOLLOW_POLL_SECONDS)


def document_events(schema: OpenAPI) -> None:
    document_json_or_sse(
        schema, "/academy/sessions/{session_id}/events", "get", "Server-sent events, one per session event, named by its type"
    )
