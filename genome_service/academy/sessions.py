"""Starting a session and reading its training curve: what the CLI and the API share."""

from __future__ import annotations

from genome_service.domain.academy import ACADEMY_SESSION, StartAcademySession, TrainingProgressed
from genome_service.domain.common import DomainError
from genome_service.domain.persona import PERSONA
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services
from genome_service.services.creation import create_stream


def start_session(
    services: Services, persona_id: str, goal: str, *, owner: str | None = None, budget_steps: int = 100,
    budget_seconds: float = 3600.0, target_similarity: float = 0.95, metadata: EventMetadata | None = None,
) -> str:
    """A new pending session for a persona `owner` may see (any persona when owner is None: the CLI)."""
    persona = services.repository.load(PERSONA, persona_id).state
    if persona is None or persona.archived or (owner is not None and persona.owner != owner):
        raise DomainError("persona_not_found", f"persona {persona_id!r} does not exist")

    def command(session_id: str) -> StartAcademySession:
        return StartAcademySession(session_id, persona.owner, persona_id, goal, target_similarity,
                                   budget_steps, budget_seconds)

    outcome = create_stream(services, ACADEMY_SESSION, metadata or EventMetadata(actor=owner or "cli"), command)
    return outcome.aggregate.stream_id


def loss_curve(services: Services, session_id: str) -> list[tuple[int, float]]:
    """(step, loss) of every recorded training step, in order (steps restart at each task)."""
    return [(e.event.step, e.event.loss) for e in services.store.read_stream(session_id)
            if isinstance(e.event, TrainingProgressed)]
