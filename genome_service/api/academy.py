"""Academy sessions over HTTP: start one for a persona, follow it (JSON history or live SSE), cancel it.

Sessions are run by academy workers (`genome-service academy worker`, or the server's own
thread on SQLite by default: `GENOME_ACADEMY_WORKER`); this controller only appends and reads.
"""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, MediaType, Request, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPI
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_201_CREATED

from genome_service.academy.shared_engine import SharedEngine
from genome_service.api.conventions import created, sse_messages, with_etag
from genome_service.api.openapi import SSE, document_json_or_sse
from genome_service.domain.academy import (
    MAX_BATCH_SIZE,
    MAX_BUDGET_SECONDS,
    MAX_BUDGET_STEPS,
    MAX_EPOCHS,
    DataSource,
    Difficulty,
    Hyperparameters,
    SessionStatus,
    TrainingData,
)
from genome_service.domain.layer import TraitType
from genome_service.services.academy_sessions import AcademySessions, Session
from genome_service.services.context import Caller, Command
from genome_service.services.reads import MAX_PAGE, EventView, Page


class HyperparametersBody(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    n_epochs: Annotated[int, msgspec.Meta(ge=1, le=MAX_EPOCHS)] | None = None
    batch_size: Annotated[int, msgspec.Meta(ge=1, le=MAX_BATCH_SIZE)] | None = None
    learning_rate_multiplier: Annotated[float, msgspec.Meta(gt=0, le=100)] | None = None


class SessionCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    persona_id: str
    goal: str
    target_similarity: float = 0.95
    budget_steps: Annotated[int, msgspec.Meta(ge=1, le=MAX_BUDGET_STEPS)] = 100
    budget_seconds: Annotated[float, msgspec.Meta(gt=0, le=MAX_BUDGET_SECONDS)] = 3600.0
    # What the layer learns from: the challenge loop, the persona's knowledge, a training file.
    sources: list[DataSource] = msgspec.field(default_factory=lambda: [DataSource.CHALLENGES])
    training_file_id: str | None = None
    validation_file_id: str | None = None
    # Attach the layer only if the held-out evaluation says it improved the persona.
    attach_if_improved: bool = True
    seed: Annotated[int, msgspec.Meta(ge=0, le=2**31 - 1)] | None = None
    # OpenAI's names: passes over the data, examples per step, a multiple of the academy's learning rate.
    hyperparameters: HyperparametersBody | None = None


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


def _location(session: Session) -> str:
    return f"/academy/sessions/{session.id}"


class AcademyController(Controller):
    path = "/academy/sessions"
    tags = ["academy"]
    sessions: AcademySessions
    engine: SharedEngine

    @post("/", operation_id="startAcademySession", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def create(self, command: NamedDependency[Command], data: JSONBody[SessionCreate]) -> Response[Session]:
        """Start a session for one of the caller's personas (one with a genome); a worker picks it up.

        `sources` picks the data: `knowledge` distils the persona's documents into the layer (cloze items,
        evaluated on a held-out form), `examples` trains on a training file (`/v1/files`), `challenges` runs
        the challenge and judge loop."""
        training = TrainingData(sources=tuple(data.sources), training_file_id=data.training_file_id,
                                validation_file_id=data.validation_file_id, attach_if_improved=data.attach_if_improved,
                                seed=data.seed, hyperparameters=Hyperparameters(**msgspec.structs.asdict(data.hyperparameters))
                                if data.hyperparameters else Hyperparameters())
        session = self.sessions.start(command, data.persona_id, data.goal, target_similarity=data.target_similarity,
                                      budget_steps=data.budget_steps, budget_seconds=data.budget_seconds, data=training)
        return created(session, _location)

    @get("/{session_id:str}", operation_id="getAcademySession", sync_to_thread=False)
    def read(self, caller: NamedDependency[Caller], session_id: FromPath[str]) -> Response[Session]:
        """One session: status, plan, counts, training step and loss, layers produced."""
        session = self.sessions.get(caller, session_id)
        return with_etag(session, session.version)

    @get("/", operation_id="listAcademySessions", sync_to_thread=False)
    def list(
        self, caller: NamedDependency[Caller],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
        status: FromQuery[SessionStatus | None] = None,
    ) -> Page:
        """The caller's sessions, oldest first, a page at a time."""
        return self.sessions.list(caller, status=status, limit=limit, cursor=cursor)

    @post("/{session_id:str}/cancel", operation_id="cancelAcademySession", status_code=200, sync_to_thread=False)
    def cancel(self, command: NamedDependency[Command], session_id: FromPath[str]) -> Response[Session]:
        """Cancel a pending or running session (its worker stops within seconds); 409 once finished."""
        session = self.sessions.cancel(command, session_id)
        return with_etag(session, session.version)

    @post("/{session_id:str}/challenges", operation_id="createAcademyChallenge", status_code=HTTP_201_CREATED)
    async def challenge(self, command: NamedDependency[Command], session_id: FromPath[str], data: JSONBody[ChallengeCreate]) -> ChallengeView:
        """A challenge the model writes for this session's goal, of the trait type and difficulty asked."""
        made = await self.engine.challenge(command.caller, session_id, data.trait_type, data.difficulty, command.metadata)
        return ChallengeView(id=made.challenge_id, trait_type=made.trait_type, difficulty=made.difficulty, prompt=made.prompt,
                             criteria=list(made.criteria))

    @post("/{session_id:str}/challenges/{challenge_id:str}/responses", operation_id="scoreAcademyResponse",
          status_code=HTTP_201_CREATED)
    async def response(
        self, command: NamedDependency[Command], session_id: FromPath[str], challenge_id: FromPath[str],
        data: JSONBody[ResponseCreate],
    ) -> Score:
        """Judge an answer to a challenge: a score 0-100 with its rationale (one response per challenge)."""
        verdict = await self.engine.score(command.caller, session_id, challenge_id, data.response, command.metadata)
        return Score(challenge_id=challenge_id, score=verdict.score, rationale=verdict.rationale, judge=verdict.judge)

    # The handler's media type is the stream's; the JSON answer names its own (as chat does).
    @get("/{session_id:str}/events", operation_id="academySessionEvents", media_type=SSE, sync_to_thread=False)
    def events(self, request: Request[Caller, None, None], caller: NamedDependency[Caller], session_id: FromPath[str]) -> Response[list[EventView]]:
        """The session's history as JSON; with `Accept: text/event-stream`, history then live events until it ends."""
        if SSE in request.headers.get("accept", ""):
            return ServerSentEvent(sse_messages(self.sessions.follow(caller, session_id)))
        return Response(self.sessions.history(caller, session_id), media_type=MediaType.JSON)


def document_events(schema: OpenAPI) -> None:
    document_json_or_sse(
        schema, "/academy/sessions/{session_id}/events", "get", "Server-sent events, one per session event, named by its type"
    )
