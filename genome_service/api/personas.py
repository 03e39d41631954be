"""Personas: who speaks, with which system prompt and which genome."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT, HTTP_410_GONE

from genome_service.api.conventions import Page, command_metadata, expected_version
from genome_service.api.errors import Gone, NotFound, problem
from genome_service.api.resources import (
    MAX_PAGE,
    EventView,
    caller_of,
    event_views,
    page,
    visible_row,
    with_etag,
)
from genome_service.domain import persona as domain
from genome_service.domain.common import DomainError
from genome_service.domain.genome import GENOME
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.tables import PersonaRow
from genome_service.services.bootstrap import Services
from genome_service.services.creation import create_stream
from genome_service.services.erasure import erase_persona

TABLE = PersonaRow.__table__  # type: ignore[attr-defined]


class PersonaCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    description: str = ""
    system_prompt: str = ""


class PersonaUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None
    system_prompt: str | None = None


class GenomeAssignment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    genome_id: str


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


def _from_aggregate(aggregate: Aggregate[domain.Persona]) -> Persona:
    state = aggregate.state
    assert state is not None and aggregate.created_at and aggregate.updated_at
    return Persona(
        state.persona_id, state.owner, state.name, state.description, state.system_prompt,
        state.genome_id, state.archived, aggregate.version, aggregate.created_at, aggregate.updated_at,
    )


def _from_row(row: dict[str, Any]) -> Persona:
    return Persona(
        row["persona_id"], row["owner"], row["name"], row["description"], row["system_prompt"],
        row["genome_id"], row["archived"], row["version"], row["created_at"], row["updated_at"],
    )


def _erased(persona_id: str) -> Exception:
    return problem(HTTP_410_GONE, "persona_erased", f"persona {persona_id!r} was erased: its knowledge and conversations are gone")


def _not_erased(row: dict[str, Any]) -> None:
    if row["erased"]:
        raise _erased(row["persona_id"])


class PersonaController(Controller):
    path = "/personas"
    tags = ["personas"]

    @post("/", operation_id="createPersona", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def create(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], data: JSONBody[PersonaCreate],
    ) -> Response[Persona]:
        """Create a persona owned by the caller."""
        owner = caller_of(request).owner
        outcome = create_stream(
            services, domain.PERSONA, command_metadata(request, owner, services.data_keys),
            lambda persona_id: domain.CreatePersona(persona_id, owner, data.name, data.description, data.system_prompt),
        )
        persona = _from_aggregate(outcome.aggregate)
        return with_etag(persona, persona.version, HTTP_201_CREATED, {"Location": f"/personas/{persona.id}"})

    @get("/{persona_id:str}", operation_id="getPersona", sync_to_thread=False)
    def read(self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str]) -> Response[Persona]:
        """One persona; 410 once archived or erased."""
        row = visible_row(services, TABLE, "persona_id", persona_id, caller_of(request), "persona", archived_column=None)
        _not_erased(row)
        if row["archived"]:
            raise Gone("persona", persona_id)
        return with_etag(_from_row(row), row["version"])

    @get("/", operation_id="listPersonas", sync_to_thread=False)
    def list(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
        archived: FromQuery[bool] = False,
    ) -> Page:
        """The caller's personas, oldest first, a page at a time."""
        owner = caller_of(request).owner

        def load(_connection: object) -> Page:
            where = [TABLE.c.owner == owner, TABLE.c.archived == archived]
            rows, next_cursor = page(services, TABLE, "persona_id", where, cursor, limit)
            return Page([_from_row(row) for row in rows], next_cursor)

        return services.database.read_through(("personas", owner, archived, limit, cursor), load)

    @patch("/{persona_id:str}", operation_id="updatePersona", sync_to_thread=False)
    def update(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        data: JSONBody[PersonaUpdate],
    ) -> Response[Persona]:
        """Change name, description or system prompt; honours If-Match."""
        command = domain.ChangePersonaProfile(data.name, data.description, data.system_prompt)
        return self._execute(request, services, persona_id, command)

    @put("/{persona_id:str}/genome", operation_id="assignGenome", sync_to_thread=False)
    def assign_genome(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        data: JSONBody[GenomeAssignment],
    ) -> Response[Persona]:
        """Make one of the persona's genomes the one it speaks with."""
        owner = caller_of(request).owner
        genome = services.repository.load(GENOME, data.genome_id).state
        if genome is None or genome.owner != owner:
            raise NotFound("genome", data.genome_id)
        facts = domain.GenomeFacts(genome.genome_id, genome.persona_id, genome.archived)
        return self._execute(request, services, persona_id, domain.AssignGenome(facts))

    # In a thread: an erasure also scrubs the database's old pages and saves the search index.
    @delete("/{persona_id:str}", operation_id="archivePersona", status_code=HTTP_204_NO_CONTENT, sync_to_thread=True)
    def archive(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str],
        erase: Annotated[bool, QueryParameter(description=(
            "true: also erase the persona's knowledge and conversations for good (its data key is destroyed); "
            "afterwards the persona answers 410 persona_erased"
        ))] = False,
    ) -> None:
        """Archive: the persona stops changing; its history stays. With `erase=true` its personal data is erased."""
        if not erase:
            self._execute(request, services, persona_id, domain.ArchivePersona())
            return
        caller = caller_of(request)
        _not_erased(visible_row(services, TABLE, "persona_id", persona_id, caller, "persona", archived_column=None))
        try:
            erase_persona(services, persona_id, command_metadata(request, caller.owner, services.data_keys))
        except DomainError as error:
            if error.rule == "persona_erased":  # a concurrent erasure came first
                raise _erased(persona_id) from None
            raise

    @get("/{persona_id:str}/events", operation_id="personaEvents", sync_to_thread=False)
    def events(self, request: Request[Any, Any, Any], services: NamedDependency[Services], persona_id: FromPath[str]) -> list[EventView]:
        """The persona's whole history, oldest first."""
        visible_row(services, TABLE, "persona_id", persona_id, caller_of(request), "persona", archived_column=None)
        return event_views(services.store.read_stream(persona_id))

    def _execute(self, request: Request[Any, Any, Any], services: Services, persona_id: str, command: Any) -> Response[Persona]:
        owner = caller_of(request).owner
        visible_row(services, TABLE, "persona_id", persona_id, caller_of(request), "persona", archived_column=None)
        outcome = services.commands.execute(
            domain.PERSONA, persona_id, command,
            expected_version=expected_version(request), metadata=command_metadata(request, owner, services.data_keys),
        )
        persona = _from_aggregate(outcome.aggregate)
        return with_etag(persona, persona.version)
