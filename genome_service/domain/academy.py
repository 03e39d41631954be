"""Academy session: one attempt to train a new layer towards a goal, within a budget."""

from __future__ import annotations

import enum
import math

import msgspec

from genome_service.domain.common import (
    Decider,
    DomainError,
    require,
    require_exists,
    require_new,
    require_text,
)

STREAM_TYPE = "academy_session"
MAX_BUDGET_STEPS = 100_000
MAX_BUDGET_SECONDS = 86_400.0


class SessionStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED})
TRANSITIONS = {
    SessionStatus.PENDING: frozenset({SessionStatus.RUNNING, SessionStatus.CANCELLED, SessionStatus.FAILED}),
    # Back to pending: the worker crashed and the session is queued again.
    SessionStatus.RUNNING: frozenset(
        {SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED, SessionStatus.PENDING}
    ),
}


# Events
class AcademySessionStarted(msgspec.Struct, frozen=True, gc=False, tag=True):
    session_id: str
    owner: str
    persona_id: str
    goal: str
    target_similarity: float
    budget_steps: int
    budget_seconds: float


class SessionStatusChanged(msgspec.Struct, frozen=True, gc=False, tag=True):
    status: SessionStatus
    reason: str = ""


AcademyEvent = AcademySessionStarted | SessionStatusChanged


# State
class AcademySession(msgspec.Struct, frozen=True, gc=False):
    session_id: str
    owner: str
    persona_id: str
    goal: str
    target_similarity: float
    budget_steps: int
    budget_seconds: float
    status: SessionStatus = SessionStatus.PENDING
    reason: str = ""


# Commands
class StartAcademySession(msgspec.Struct, frozen=True, gc=False):
    session_id: str
    owner: str
    persona_id: str
    goal: str
    target_similarity: float = 0.95
    budget_steps: int = 100
    budget_seconds: float = 3600.0


class ChangeSessionStatus(msgspec.Struct, frozen=True, gc=False):
    status: SessionStatus
    reason: str = ""


AcademyCommand = StartAcademySession | ChangeSessionStatus


def decide(command: AcademyCommand, state: AcademySession | None) -> list[AcademyEvent]:
    if isinstance(command, StartAcademySession):
        require_new(state, "academy_session")
        _require_plan(command)
        return [AcademySessionStarted(**msgspec.structs.asdict(command))]
    require_exists(state, "academy_session")
    assert state is not None
    match command:
        case ChangeSessionStatus(status=status, reason=reason):
            if status == state.status:
                return []
            require(
                state.status not in TERMINAL,
                "session_finished",
                f"session {state.session_id} is {state.status.value} and can no longer change",
            )
            require(
                status in TRANSITIONS[state.status],
                "status_transition_not_allowed",
                f"session {state.session_id} cannot go from {state.status.value} to {status.value}",
            )
            return [SessionStatusChanged(status, reason)]
    raise DomainError("unknown_command", f"academy session cannot handle {type(command).__name__}")


def _require_plan(command: StartAcademySession) -> None:
    require_text(command.goal, "goal", max_length=2000)
    similarity, steps, seconds = command.target_similarity, command.budget_steps, command.budget_seconds
    require(
        math.isfinite(similarity) and 0.0 < similarity <= 1.0,
        "target_similarity_out_of_range",
        f"target_similarity must be a finite number in (0, 1] (got {similarity})",
    )
    require(
        1 <= steps <= MAX_BUDGET_STEPS,
        "budget_steps_out_of_range",
        f"budget_steps must be in 1..{MAX_BUDGET_STEPS} (got {steps})",
    )
    require(
        math.isfinite(seconds) and 0.0 < seconds <= MAX_BUDGET_SECONDS,
        "budget_seconds_out_of_range",
        f"budget_seconds must be a finite number in (0, {MAX_BUDGET_SECONDS:g}] (got {seconds})",
    )


def evolve(state: AcademySession | None, event: AcademyEvent) -> AcademySession:
    match event:
        case AcademySessionStarted():
            return AcademySession(**msgspec.structs.asdict(event))
    assert state is not None, f"{type(event).__name__} before AcademySessionStarted"
    match event:
        case SessionStatusChanged(status=status, reason=reason):
            return msgspec.structs.replace(state, status=status, reason=reason)
    raise TypeError(f"unknown academy session event {type(event).__name__}")


ACADEMY_SESSION = Decider(
    stream_type=STREAM_TYPE,
    event_type=AcademyEvent,
    state_type=AcademySession,
    decide=decide,
    evolve=evolve,
)
