"""Genomes: ordered, weighted stacks of layers on one base model, with their history.

Reads come from the read model (a genome and its stack in one statement, cached until
the next commit), or from the log for a genome as it was at a version or a time.
Only the owner sees a genome; a layer may be stacked if it is the owner's or public.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

import msgspec
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from genome_service.domain import genome as domain
from genome_service.domain.layer import LAYER
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.queries import Row, child_rows, get_row, get_row_with_children
from genome_service.projections.tables import GENOME_LAYER_REFS, GENOMES, PERSONAS
from genome_service.services import personas
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.errors import Gone, InvalidRequest, NotFound
from genome_service.services.reads import EventView, Page, Visibility, event_views, page, visible_row

# Stream versions are 32-bit integers in the database.
MAX_VERSION = 2**31 - 1
VISIBILITY = Visibility(GENOMES, "genome_id", "genome", archived=None)


class StackedLayer(msgspec.Struct, frozen=True):
    layer_id: str
    weight: float
    position: int


class Genome(msgspec.Struct, frozen=True):
    id: str
    owner: str
    persona_id: str
    base_model: str
    name: str
    description: str
    layers: list[StackedLayer]
    parent_ids: list[str]
    generation: int
    archived: bool
    version: int
    created_at: datetime
    updated_at: datetime


def _from_aggregate(aggregate: Aggregate[domain.Genome]) -> Genome:
    s = aggregate.state
    assert s is not None and aggregate.created_at and aggregate.updated_at
    return Genome(
        id=s.genome_id, owner=s.owner, persona_id=s.persona_id, base_model=s.base_model, name=s.name,
        description=s.description, layers=[StackedLayer(ref.layer_id, ref.weight, i) for i, ref in enumerate(s.layers)],
        parent_ids=list(s.parent_ids), generation=s.generation, archived=s.archived, version=aggregate.version,
        created_at=aggregate.created_at, updated_at=aggregate.updated_at,
    )


def _from_row(row: Row, layers: list[StackedLayer]) -> Genome:
    return Genome(
        id=row["genome_id"], owner=row["owner"], persona_id=row["persona_id"], base_model=row["base_model"],
        name=row["name"], description=row["description"], layers=layers, parent_ids=row["parent_ids"],
        generation=row["generation"], archived=row["archived"], version=row["version"],
        created_at=row["created_at"], updated_at=row["updated_at"],
    )


def read_genome(connection: Connection, genome_id: str) -> Genome | None:
    """A genome and its stack from the read model, in one statement."""
    found = get_row_with_children(connection, GENOMES, "genome_id", genome_id, GENOME_LAYER_REFS, "position")
    if found is None:
        return None
    row, refs = found
    return _from_row(row, [StackedLayer(r["layer_id"], r["weight"], r["position"]) for r in refs])


def _stacks(connection: Connection, genome_ids: list[str]) -> dict[str, list[StackedLayer]]:
    stacks: dict[str, list[StackedLayer]] = {genome_id: [] for genome_id in genome_ids}
    for row in child_rows(connection, GENOME_LAYER_REFS, "genome_id", genome_ids, "position"):
        stacks[row["genome_id"]].append(StackedLayer(row["layer_id"], row["weight"], row["position"]))
    return stacks


def _utc_moment(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise InvalidRequest("as_of needs a time zone, e.g. 2026-01-01T12:00:00Z")
    try:
        return moment.astimezone(UTC)
    except OverflowError as error:
        raise InvalidRequest(f"as_of {moment.isoformat()} is out of range once converted to UTC") from error


class Genomes:
    def __init__(self, services: Services) -> None:
        self.services = services

    # Access
    def owned_state(self, caller: Caller, genome_id: str) -> domain.Genome:
        """The genome's current state from its stream, if it is the caller's (archived ones included)."""
        state = self.services.repository.load(domain.GENOME, genome_id).state
        if state is None or state.owner != caller.owner:
            raise NotFound("genome", genome_id)
        return state

    def layer_facts(self, caller: Caller, layer_id: str) -> domain.LayerFacts:
        """What a genome needs to know of a layer the caller may stack: its own, or a public one."""
        layer = self.services.repository.load(LAYER, layer_id).state
        if layer is None or (layer.owner != caller.owner and not layer.public):
            raise NotFound("layer", layer_id)
        return domain.LayerFacts(layer.layer_id, layer.base_model, layer.deprecated)

    # Reads
    def get(self, caller: Caller, genome_id: str, *, version: int | None = None, as_of: datetime | None = None) -> Genome:
        """One genome now, or as it was at a version or a time; archived ones are gone (410) now."""
        if version is None and as_of is None:
            genome = self.services.database.read_through(("genome", genome_id), lambda c: read_genome(c, genome_id))
            if genome is None or genome.owner != caller.owner:
                raise NotFound("genome", genome_id)
            if genome.archived:
                raise Gone("genome", genome_id)
            return genome
        self.owned_state(caller, genome_id)
        moment = _utc_moment(as_of) if as_of is not None else None
        past = self.services.repository.load(domain.GENOME, genome_id, to_version=version, as_of=moment)
        if past.state is None:
            raise NotFound("genome", f"{genome_id} at that time")
        if version is not None and past.version < version:
            raise NotFound("genome", f"{genome_id} version {version}")
        return _from_aggregate(past)

    def list(
        self, caller: Caller, *, persona_id: str | None = None, base_model: str | None = None, layer_id: str | None = None,
        archived: bool = False, limit: int = 50, cursor: str | None = None,
    ) -> Page:
        """The caller's genomes, oldest first, filtered, a page at a time."""
        owner = caller.owner

        def load(connection: Connection) -> Page:
            where = [GENOMES.c.owner == owner, GENOMES.c.archived == archived]
            if persona_id is not None:
                where.append(GENOMES.c.persona_id == persona_id)
            if base_model is not None:
                where.append(GENOMES.c.base_model == base_model)
            if layer_id is not None:
                holding = sa.select(GENOME_LAYER_REFS.c.genome_id).where(GENOME_LAYER_REFS.c.layer_id == layer_id)
                where.append(GENOMES.c.genome_id.in_(holding))
            rows, next_cursor = page(self.services, GENOMES, "genome_id", where, cursor, limit)
            stacks = _stacks(connection, [row["genome_id"] for row in rows])
            return Page([_from_row(row, stacks[row["genome_id"]]) for row in rows], next_cursor)

        key = ("genomes", owner, persona_id, base_model, layer_id, archived, limit, cursor)
        return self.services.database.read_through(key, load)

    def of_persona(self, persona_id: str) -> Genome | None:
        """The genome a persona speaks with now (any owner's: for the academy's workers), if it has one."""
        with self.services.database.read() as connection:
            persona = get_row(connection, PERSONAS, "persona_id", persona_id)
            genome_id = persona["genome_id"] if persona is not None else None
            return read_genome(connection, genome_id) if genome_id else None

    def events(self, caller: Caller, genome_id: str) -> list[EventView]:
        """The genome's whole history, oldest first (archived ones too)."""
        visible_row(self.services, VISIBILITY, genome_id, caller)
        return event_views(self.services.store.read_stream(genome_id))

    # Commands
    def create(self, command: Command, persona_id: str, base_model: str, name: str, description: str = "") -> Genome:
        """An empty genome for one of the caller's live personas."""
        personas.Personas(self.services).live_state(command.caller, persona_id)
        owner = command.owner
        outcome = create_stream(
            self.services, domain.GENOME, command.metadata,
            lambda genome_id: domain.CreateGenome(genome_id, owner, persona_id, base_model, name, description),
        )
        return _from_aggregate(outcome.aggregate)

    def fork(
        self, command: Command, genome_id: str, name: str, *, persona_id: str | None = None, description: str = "",
        other_parent_ids: Sequence[str] = (),
    ) -> Genome:
        """A new genome that starts from this one's stack (and other parents', first occurrence wins)."""
        parents = tuple(self.owned_state(command.caller, pid) for pid in (genome_id, *other_parent_ids))
        child_persona = persona_id or parents[0].persona_id
        personas.Personas(self.services).live_state(command.caller, child_persona)
        owner = command.owner
        outcome = create_stream(
            self.services, domain.GENOME, command.metadata,
            lambda child_id: domain.ForkGenome(child_id, owner, child_persona, name, parents, description),
        )
        return _from_aggregate(outcome.aggregate)

    def update(self, command: Command, genome_id: str, *, name: str | None = None, description: str | None = None) -> Genome:
        return self._execute(command, genome_id, domain.ChangeGenomeDetails(name, description))

    def replace_layers(self, command: Command, genome_id: str, layers: Sequence[tuple[str, float]]) -> Genome:
        """Set the whole ordered, weighted stack (index 0 at the bottom) in one atomic change."""
        visible_row(self.services, VISIBILITY, genome_id, command.caller)
        stack = tuple((self.layer_facts(command.caller, layer_id), weight) for layer_id, weight in layers)
        return self._execute(command, genome_id, domain.ReplaceLayerStack(stack))

    def attach_layer(self, command: Command, genome_id: str, layer_id: str, weight: float = 1.0, position: int | None = None) -> Genome:
        visible_row(self.services, VISIBILITY, genome_id, command.caller)
        facts = self.layer_facts(command.caller, layer_id)
        return self._execute(command, genome_id, domain.AttachLayer(facts, weight, position))

    def detach_layer(self, command: Command, genome_id: str, layer_id: str) -> Genome:
        return self._execute(command, genome_id, domain.DetachLayer(layer_id))

    def archive(self, command: Command, genome_id: str) -> Genome:
        return self._execute(command, genome_id, domain.ArchiveGenome())

    def _execute(self, command: Command, genome_id: str, change: object) -> Genome:
        visible_row(self.services, VISIBILITY, genome_id, command.caller)
        outcome = self.services.commands.execute(
            domain.GENOME, genome_id, change, expected_version=command.expected_version, metadata=command.metadata,
        )
        return _from_aggregate(outcome.aggregate)
