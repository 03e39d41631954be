"""Personas: who speaks, with which system prompt and which genome.

Only the owner sees a persona. An archived persona answers 410 and stops changing; an
erased one (its knowledge and conversations crypto-shredded) says so with its own rule.
"""

from __future__ import annotations

from datetime import datetime

import msgspec
import sqlalchemy as sa

from genome_service.domain import persona as domain
from genome_service.domain.common import DomainError
from genome_service.domain.genome import GENOME, CreateGenome
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.queries import Row
from genome_service.projections.tables import PERSONAS
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.erasure import erase_persona
from genome_service.services.errors import Gone, NotFound, PersonaDataErased
from genome_service.services.reads import EventView, Page, Visibility, event_views, page, visible_row

# Archived personas are still found (their history, their conversations); callers decide.
VISIBILITY = Visibility(PERSONAS, "persona_id", "persona", archived=None)
LIVE = Visibility(PERSONAS, "persona_id", "persona")
MAX_MODELS = 1000


class Persona(msgspec.Struct, frozen=True):
    id: str
    owner: str
    name: str
    description: str
    system_prompt: str
    genome_id: str | None
    archived: bool
    version: int
    created_at: datetime
    updated_at: datetime


class PersonaModel(msgspec.Struct, frozen=True):
    """A live persona as a model name for OpenAI-compatible clients."""

    id: str
    name: str
    created_at: datetime


def _from_aggregate(aggregate: Aggregate[domain.Persona]) -> Persona:
    s = aggregate.state
    assert s is not None and aggregate.created_at and aggregate.updated_at
    return Persona(
        id=s.persona_id, owner=s.owner, name=s.name, description=s.description, system_prompt=s.system_prompt,
        genome_id=s.genome_id, archived=s.archived, version=aggregate.version,
        created_at=aggregate.created_at, updated_at=aggregate.updated_at,
    )


def _from_row(row: Row) -> Persona:
    return Persona(
        id=row["persona_id"], owner=row["owner"], name=row["name"], description=row["description"],
        system_prompt=row["system_prompt"], genome_id=row["genome_id"], archived=row["archived"],
        version=row["version"], created_at=row["created_at"], updated_at=row["updated_at"],
    )


def _not_erased(row: Row) -> Row:
    if row["erased"]:
        raise PersonaDataErased(row["persona_id"])
    return row


class Personas:
    def __init__(self, services: Services) -> None:
        self.services = services

    # Access
    def visible(self, caller: Caller, persona_id: str, *, live: bool = True) -> Row:
        """The persona's row if the caller owns it; archived ones are gone (410) unless ``live`` is off."""
        return visible_row(self.services, LIVE if live else VISIBILITY, persona_id, caller)

    def readable(self, caller: Caller, persona_id: str) -> Row:
        """A persona whose data may still be read: archived ones yes, erased ones no (410 persona_erased)."""
        return _not_erased(self.visible(caller, persona_id, live=False))

    def live_state(self, caller: Caller, persona_id: str) -> domain.Persona:
        """The persona's state from its stream, if it is the caller's and not archived."""
        persona = self.services.repository.load(domain.PERSONA, persona_id).state
        if persona is None or persona.owner != caller.owner:
            raise NotFound("persona", persona_id)
        if persona.archived:
            raise Gone("persona", persona_id)
        return persona

    # Reads
    def get(self, caller: Caller, persona_id: str) -> Persona:
        """One persona; 410 once archived or erased."""
        row = self.readable(caller, persona_id)
        if row["archived"]:
            raise Gone("persona", persona_id)
        return _from_row(row)

    def list(self, caller: Caller, *, archived: bool = False, limit: int = 50, cursor: str | None = None) -> Page:
        """The caller's personas, oldest first, a page at a time."""
        owner = caller.owner

        def load(_connection: object) -> Page:
            where = [PERSONAS.c.owner == owner, PERSONAS.c.archived == archived]
            rows, next_cursor = page(self.services, PERSONAS, "persona_id", where, cursor, limit)
            return Page([_from_row(row) for row in rows], next_cursor)

        return self.services.database.read_through(("personas", owner, archived, limit, cursor), load)

    def genome_id(self, caller: Caller, persona_id: str) -> str:
        """The genome a live persona of the caller's speaks with; ``genome_not_found`` when it has none."""
        genome_id = self.get(caller, persona_id).genome_id
        if genome_id is None:
            raise NotFound("genome", f"of persona {persona_id}")
        return genome_id

    def events(self, caller: Caller, persona_id: str) -> list[EventView]:
        """The persona's whole history, oldest first."""
        self.visible(caller, persona_id, live=False)
        return event_views(self.services.store.read_stream(persona_id))

    def as_models(self, caller: Caller) -> list[PersonaModel]:
        """The caller's live personas, oldest first, as OpenAI-compatible models (at most ``MAX_MODELS``)."""
        statement = (sa.select(PERSONAS.c.persona_id, PERSONAS.c.name, PERSONAS.c.created_at)
                     .where(PERSONAS.c.owner == caller.owner, PERSONAS.c.archived.is_(False))
                     .order_by(PERSONAS.c.created_at, PERSONAS.c.persona_id).limit(MAX_MODELS))
        with self.services.database.read() as connection:
            rows = connection.execute(statement).all()
        return [PersonaModel(id=pid, name=name, created_at=created) for pid, name, created in rows]

    def resolve_model(self, caller: Caller, model: str) -> str:
        """The persona id ``model`` names among the caller's live personas: its id, else its unique name."""
        columns = (PERSONAS.c.persona_id,)
        live = [PERSONAS.c.owner == caller.owner, PERSONAS.c.archived.is_(False)]
        with self.services.database.read() as connection:
            by_id = connection.execute(sa.select(*columns).where(PERSONAS.c.persona_id == model, *live)).all()
            by_name = by_id or connection.execute(sa.select(*columns).where(PERSONAS.c.name == model, *live).limit(2)).all()
        if len(by_name) > 1:
            raise DomainError("model_ambiguous", f"more than one of your personas is named {model!r}: use its id")
        if not by_name:
            raise NotFound("model", model)
        return str(by_name[0][0])

    # Commands
    def create(
        self, command: Command, name: str, *, description: str = "", system_prompt: str = "", base_model: str | None = None,
    ) -> Persona:
        """A persona owned by the caller; with ``base_model``, also an empty genome on that model that it speaks with.

        The persona, its genome and the assignment are three appends. Each takes its own
        idempotency key derived from the request's, so a retry of a request that failed
        half-way finishes it without doubling anything.
        """
        if base_model is not None:
            self.services.models.get(base_model)  # an unknown model is refused before anything is written
        owner = command.owner
        created = create_stream(
            self.services, domain.PERSONA, command.metadata,
            lambda persona_id: domain.CreatePersona(persona_id, owner, name, description, system_prompt),
        )
        if base_model is None:
            return _from_aggregate(created.aggregate)
        persona_id = created.aggregate.stream_id
        genome = create_stream(
            self.services, GENOME, command.derived("genome").metadata,
            lambda genome_id: CreateGenome(genome_id, owner, persona_id, base_model, name),
        )
        facts = domain.GenomeFacts(genome.aggregate.stream_id, persona_id, archived=False)
        outcome = self.services.commands.execute(
            domain.PERSONA, persona_id, domain.AssignGenome(facts), metadata=command.derived("assign").metadata,
        )
        return _from_aggregate(outcome.aggregate)

    def update(
        self, command: Command, persona_id: str, *, name: str | None = None, description: str | None = None,
        system_prompt: str | None = None,
    ) -> Persona:
        return self._execute(command, persona_id, domain.ChangePersonaProfile(name, description, system_prompt))

    def assign_genome(self, command: Command, persona_id: str, genome_id: str) -> Persona:
        """Make one of the persona's genomes the one it speaks with."""
        genome = self.services.repository.load(GENOME, genome_id).state
        if genome is None or genome.owner != command.owner:
            raise NotFound("genome", genome_id)
        facts = domain.GenomeFacts(genome.genome_id, genome.persona_id, genome.archived)
        return self._execute(command, persona_id, domain.AssignGenome(facts))

    def archive(self, command: Command, persona_id: str, *, erase: bool = False) -> None:
        """Archive; with ``erase`` also erase its knowledge and conversations for good (its data key is destroyed)."""
        if not erase:
            self._execute(command, persona_id, domain.ArchivePersona())
            return
        self.readable(command.caller, persona_id)
        try:
            erase_persona(self.services, persona_id, command.metadata)
        except DomainError as error:
            if error.rule == "persona_erased":  # a concurrent erasure came first
                raise PersonaDataErased(persona_id) from None
            raise

    def _execute(self, command: Command, persona_id: str, change: object) -> Persona:
        self.visible(command.caller, persona_id, live=False)
        outcome = self.services.commands.execute(
            domain.PERSONA, persona_id, change, expected_version=command.expected_version, metadata=command.metadata,
        )
        return _from_aggregate(outcome.aggregate)
