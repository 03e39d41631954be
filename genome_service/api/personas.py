"""Personas over HTTP: who speaks, with which system prompt and which genome."""

from __future__ import annotations

from typing import Annotated

import msgspec
from litestar import Controller, Response, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from genome_service.api.conventions import created, with_etag
from genome_service.services.context import Caller, Command
from genome_service.services.personas import Persona, Personas
from genome_service.services.reads import MAX_PAGE, EventView, Page


class PersonaCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    description: str = ""
    system_prompt: str = ""
    # Also create an empty genome on this model and make it the persona's, in the same request.
    base_model: str | None = None


class PersonaUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None
    system_prompt: str | None = None


class GenomeAssignment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    genome_id: str


def _location(persona: Persona) -> str:
    return f"/personas/{persona.id}"


class PersonaController(Controller):
    path = "/personas"
    tags = ["personas"]
    personas: Personas

    @post("/", operation_id="createPersona", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def create(self, command: NamedDependency[Command], data: JSONBody[PersonaCreate]) -> Response[Persona]:
        """Create a persona owned by the caller; with `base_model`, also its genome on that model."""
        persona = self.personas.create(command, data.name, description=data.description, system_prompt=data.system_prompt,
                                       base_model=data.base_model)
        return created(persona, _location)

    @get("/{persona_id:str}", operation_id="getPersona", sync_to_thread=False)
    def read(self, caller: NamedDependency[Caller], persona_id: FromPath[str]) -> Response[Persona]:
        """One persona; 410 once archived or erased."""
        persona = self.personas.get(caller, persona_id)
        return with_etag(persona, persona.version)

    @get("/", operation_id="listPersonas", sync_to_thread=False)
    def list(
        self, caller: NamedDependency[Caller],
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
        archived: FromQuery[bool] = False,
    ) -> Page:
        """The caller's personas, oldest first, a page at a time."""
        return self.personas.list(caller, archived=archived, limit=limit, cursor=cursor)

    @patch("/{persona_id:str}", operation_id="updatePersona", sync_to_thread=False)
    def update(self, command: NamedDependency[Command], persona_id: FromPath[str], data: JSONBody[PersonaUpdate]) -> Response[Persona]:
        """Change name, description or system prompt; honours If-Match."""
        persona = self.personas.update(command, persona_id, name=data.name, description=data.description,
                                       system_prompt=data.system_prompt)
        return with_etag(persona, persona.version)

    @put("/{persona_id:str}/genome", operation_id="assignGenome", sync_to_thread=False)
    def assign_genome(self, command: NamedDependency[Command], persona_id: FromPath[str], data: JSONBody[GenomeAssignment]) -> Response[Persona]:
        """Make one of the persona's genomes the one it speaks with."""
        persona = self.personas.assign_genome(command, persona_id, data.genome_id)
        return with_etag(persona, persona.version)

    # In a thread: an erasure also scrubs the database's old pages and saves the search index.
    @delete("/{persona_id:str}", operation_id="archivePersona", status_code=HTTP_204_NO_CONTENT, sync_to_thread=True)
    def archive(
        self, command: NamedDependency[Command], persona_id: FromPath[str],
        erase: Annotated[bool, QueryParameter(description=(
            "true: also erase the persona's knowledge and conversations for good (its data key is destroyed); "
            "afterwards the persona answers 410 persona_erased"
        ))] = False,
    ) -> None:
        """Archive: the persona stops changing; its history stays. With `erase=true` its personal data is erased."""
        self.personas.archive(command, persona_id, erase=erase)

    @get("/{persona_id:str}/events", operation_id="personaEvents", sync_to_thread=False)
    def events(self, caller: NamedDependency[Caller], persona_id: FromPath[str]) -> list[EventView]:
        """The persona's whole history, oldest first."""
        return self.personas.events(caller, persona_id)
