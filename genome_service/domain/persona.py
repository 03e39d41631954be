"""Persona: who speaks, with which system prompt and which genome."""

from __future__ import annotations

import msgspec

from genome_service.domain.common import (
    Decider,
    DomainError,
    require,
    require_exists,
    require_new,
    require_not_archived,
    require_text,
)

STREAM_TYPE = "persona"
MAX_SYSTEM_PROMPT = 20_000


# Events
class PersonaCreated(msgspec.Struct, frozen=True, gc=False, tag=True):
    persona_id: str
    owner: str
    name: str
    description: str = ""
    system_prompt: str = ""


class PersonaProfileChanged(msgspec.Struct, frozen=True, gc=False, tag=True, omit_defaults=True):
    name: str | None = None
    description: str | None = None
    system_prompt: str | None = None


class GenomeAssigned(msgspec.Struct, frozen=True, gc=False, tag=True):
    genome_id: str


class PersonaArchived(msgspec.Struct, frozen=True, gc=False, tag=True):
    pass


class PersonaErased(msgspec.Struct, frozen=True, gc=False, tag=True):
    """The persona's personal data was crypto-shredded; the event itself holds none."""


PersonaEvent = PersonaCreated | PersonaProfileChanged | GenomeAssigned | PersonaArchived | PersonaErased


# State
class Persona(msgspec.Struct, frozen=True, gc=False):
    persona_id: str
    owner: str
    name: str
    description: str
    system_prompt: str
    genome_id: str | None = None
    archived: bool = False
    erased: bool = False  # erased implies archived


# Commands
class CreatePersona(msgspec.Struct, frozen=True, gc=False):
    persona_id: str
    owner: str
    name: str
    description: str = ""
    system_prompt: str = ""


class ChangePersonaProfile(msgspec.Struct, frozen=True, gc=False):
    name: str | None = None
    description: str | None = None
    system_prompt: str | None = None


class GenomeFacts(msgspec.Struct, frozen=True, gc=False):
    """What the persona needs to know of a genome to accept it."""

    genome_id: str
    persona_id: str
    archived: bool


class AssignGenome(msgspec.Struct, frozen=True, gc=False):
    genome: GenomeFacts


class ArchivePersona(msgspec.Struct, frozen=True, gc=False):
    pass


class ErasePersona(msgspec.Struct, frozen=True, gc=False):
    pass


PersonaCommand = CreatePersona | ChangePersonaProfile | AssignGenome | ArchivePersona | ErasePersona


def decide(command: PersonaCommand, state: Persona | None) -> list[PersonaEvent]:
    if isinstance(command, CreatePersona):
        require_new(state, "persona")
        require_text(command.name, "name", max_length=200)
        _require_prompt_length(command.system_prompt)
        return [PersonaCreated(**msgspec.structs.asdict(command))]
    require_exists(state, "persona")
    assert state is not None
    if isinstance(command, ErasePersona):
        # An archived persona's data may be erased too; erasing is done once.
        require(not state.erased, "persona_erased", f"persona {state.persona_id} is already erased")
        return [PersonaErased()]
    require_not_archived(state.archived, "persona")
    match command:
        case ChangePersonaProfile(name=name, description=description, system_prompt=prompt):
            if name is not None:
                require_text(name, "name", max_length=200)
            if prompt is not None:
                _require_prompt_length(prompt)
            changed = {
                key: value
                for key, value in (("name", name), ("description", description), ("system_prompt", prompt))
                if value is not None and value != getattr(state, key)
            }
            return [PersonaProfileChanged(**changed)] if changed else []
        case AssignGenome(genome=genome):
            require(
                genome.persona_id == state.persona_id,
                "genome_of_other_persona",
                f"genome {genome.genome_id} was created for persona {genome.persona_id}, not {state.persona_id}",
            )
            require(not genome.archived, "genome_archived", f"genome {genome.genome_id} is archived")
            return [] if state.genome_id == genome.genome_id else [GenomeAssigned(genome.genome_id)]
        case ArchivePersona():
            return [PersonaArchived()]
    raise DomainError("unknown_command", f"persona cannot handle {type(command).__name__}")


def _require_prompt_length(prompt: str) -> None:
    require(
        len(prompt) <= MAX_SYSTEM_PROMPT,
        "system_prompt_too_long",
        f"system_prompt must be at most {MAX_SYSTEM_PROMPT} characters (got {len(prompt)})",
    )


def evolve(state: Persona | None, event: PersonaEvent) -> Persona:
    match event:
        case PersonaCreated():
            return Persona(
                persona_id=event.persona_id,
                owner=event.owner,
                name=event.name,
                description=event.description,
                system_prompt=event.system_prompt,
            )
    assert state is not None, f"{type(event).__name__} before PersonaCreated"
    match event:
        case PersonaProfileChanged():
            changes = {k: v for k, v in msgspec.structs.asdict(event).items() if v is not None}
            return msgspec.structs.replace(state, **changes)
        case GenomeAssigned(genome_id=genome_id):
            return msgspec.structs.replace(state, genome_id=genome_id)
        case PersonaArchived():
            return msgspec.structs.replace(state, archived=True)
        case PersonaErased():
            return msgspec.structs.replace(state, archived=True, erased=True)
    raise TypeError(f"unknown persona event {type(event).__name__}")


PERSONA = Decider(
    stream_type=STREAM_TYPE,
    event_type=PersonaEvent,
    state_type=Persona,
    decide=decide,
    evolve=evolve,
)
