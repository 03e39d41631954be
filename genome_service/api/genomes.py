"""Genomes: ordered, weighted stacks of layers on one base model, with their history."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any

import msgspec
import sqlalchemy as sa
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.exceptions import ClientException
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT
from sqlalchemy.engine import Connection

from genome_service.api.auth import Caller
from genome_service.api.conventions import Page, command_metadata, expected_version
from genome_service.api.errors import Gone, NotFound
from genome_service.api.resources import (
    MAX_PAGE,
    EventView,
    caller_of,
    event_views,
    page,
    visible_row,
    with_etag,
)
from genome_service.domain import genome as domain
from genome_service.domain.layer import LAYER
from genome_service.domain.persona import PERSONA
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.queries import child_rows, get_row_with_children
from genome_service.projections.tables import GenomeLayerRefRow, GenomeRow
from genome_service.services.bootstrap import Services
from genome_service.services.creation import create_stream

TABLE = GenomeRow.__table__  # type: ignore[attr-defined]
REFS = GenomeLayerRefRow.__table__  # type: ignore[attr-defined]


class GenomeCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    persona_id: str
    base_model: str
    name: str
    description: str = ""


class GenomeUpdate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str | None = None
    description: str | None = None


class LayerWeight(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    layer_id: str
    weight: float = 1.0


class LayerAttachment(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    layer_id: str
    weight: float = 1.0
    position: int | None = None  # None: on top of the stack


class LayerStack(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    layers: list[LayerWeight]


class GenomeFork(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    persona_id: str | None = None  # default: the parent's persona
    description: str = ""
    other_parent_ids: list[str] = []


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
    layers = [StackedLayer(ref.layer_id, ref.weight, i) for i, ref in enumerate(s.layers)]
    return Genome(
        s.genome_id, s.owner, s.persona_id, s.base_model, s.name, s.description, layers,
        list(s.parent_ids), s.generation, s.archived, aggregate.version, aggregate.created_at, aggregate.updated_at,
    )


def _from_row(row: dict[str, Any], layers: list[StackedLayer]) -> Genome:
    return Genome(
        row["genome_id"], row["owner"], row["persona_id"], row["base_model"], row["name"], row["description"],
        layers, row["parent_ids"], row["generation"], row["archived"], row["version"], row["created_at"], row["updated_at"],
    )


def _read_genome(connection: Connection, genome_id: str) -> Genome | None:
    found = get_row_with_children(connection, TABLE, "genome_id", genome_id, REFS, "position")
    if found is None:
        return None
    row, refs = found
    return _from_row(row, [StackedLayer(r["layer_id"], r["weight"], r["position"]) for r in refs])


# Stream versions are 32-bit integers in the database.
MAX_VERSION = 2**31 - 1


def _utc_moment(moment: datetime) -> datetime:
    if moment.tzinfo is None:
        raise ClientException("as_of needs a time zone, e.g. 2026-01-01T12:00:00Z")
    try:
        return moment.astimezone(UTC)
    except OverflowError as error:
        raise ClientException(f"as_of {moment.isoformat()} is out of range once converted to UTC") from error


def _stacks(connection: Connection, genome_ids: list[str]) -> dict[str, list[StackedLayer]]:
    stacks: dict[str, list[StackedLayer]] = {genome_id: [] for genome_id in genome_ids}
    for row in child_rows(connection, REFS, "genome_id", genome_ids, "position"):
        stacks[row["genome_id"]].append(StackedLayer(row["layer_id"], row["weight"], row["position"]))
    return stacks


def _visible_genome(services: Services, genome_id: str, caller: Caller) -> domain.Genome:
    state = services.repository.load(domain.GENOME, genome_id).state
    if state is None or state.owner != caller.owner:
        raise NotFound("genome", genome_id)
    return state


def _layer_facts(services: Services, layer_id: str, caller: Caller) -> domain.LayerFacts:
    layer = services.repository.load(LAYER, layer_id).state
    if layer is None or (layer.owner != caller.owner and not layer.public):
        raise NotFound("layer", layer_id)
    return domain.LayerFacts(layer.layer_id, layer.base_model, layer.deprecated)


def _own_persona(services: Services, persona_id: str, caller: Caller) -> None:
    persona = services.repository.load(PERSONA, persona_id).state
    if persona is None or persona.owner != caller.owner:
        raise NotFound("persona", persona_id)
    if persona.archived:
        raise Gone("persona", persona_id)


class GenomeController(Controller):
    path = "/genomes"
    tags = ["genomes"]

    @post("/", operation_id="createGenome", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def create(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], data: JSONBody[GenomeCreate],
    ) -> Response[Genome]:
        """Create an empty genome for one of the caller's personas."""
        caller = caller_of(request)
        _own_persona(services, data.persona_id, caller)
        outcome = create_stream(
            services, domain.GENOME, command_metadata(request, caller.owner, services.data_keys),
            lambda genome_id: domain.CreateGenome(genome_id, caller.owner, data.persona_id, data.base_model, data.name, data.description),
        )
        genome = _from_aggregate(outcome.aggregate)
        return with_etag(genome, genome.version, HTTP_201_CREATED, {"Location": f"/genomes/{genome.id}"})

    @get("/{genome_id:str}", operation_id="getGenome", sync_to_thread=False)
    def read(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str],
        version: Annotated[int | None, QueryParameter(ge=1, le=MAX_VERSION, description="Replay the stream up to this version.")] = None,
        as_of: Annotated[datetime | None, QueryParameter(description="Replay the stream as it was at this time (ISO 8601).")] = None,
    ) -> Response[Genome]:
        """One genome now, or as it was at a version or a time; 410 once archived."""
        caller = caller_of(request)
        if version is None and as_of is None:
            genome = services.database.read_through(("genome", genome_id), lambda c: _read_genome(c, genome_id))
            if genome is None or genome.owner != caller.owner:
                raise NotFound("genome", genome_id)
            if genome.archived:
                raise Gone("genome", genome_id)
            return with_etag(genome, genome.version)
        _visible_genome(services, genome_id, caller)
        if as_of is not None:
            as_of = _utc_moment(as_of)
        past = services.repository.load(domain.GENOME, genome_id, to_version=version, as_of=as_of)
        if past.state is None:
            raise NotFound("genome", f"{genome_id} at that time")
        if version is not None and past.version < version:
            raise NotFound("genome", f"{genome_id} version {version}")
        return with_etag(_from_aggregate(past), past.version)

    @get("/", operation_id="listGenomes", sync_to_thread=False)
    def list(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services],
        persona_id: FromQuery[str | None] = None,
        base_model: FromQuery[str | None] = None,
        layer_id: Annotated[str | None, QueryParameter(description="Only genomes whose stack holds this layer.")] = None,
        archived: FromQuery[bool] = False,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
    ) -> Page:
        """The caller's genomes, oldest first, filtered, a page at a time."""
        owner = caller_of(request).owner

        def load(connection: Connection) -> Page:
            where = [TABLE.c.owner == owner, TABLE.c.archived == archived]
            if persona_id is not None:
                where.append(TABLE.c.persona_id == persona_id)
            if base_model is not None:
                where.append(TABLE.c.base_model == base_model)
            if layer_id is not None:
                where.append(TABLE.c.genome_id.in_(sa.select(REFS.c.genome_id).where(REFS.c.layer_id == layer_id)))
            rows, next_cursor = page(services, TABLE, "genome_id", where, cursor, limit)
            stacks = _stacks(connection, [row["genome_id"] for row in rows])
            return Page([_from_row(row, stacks[row["genome_id"]]) for row in rows], next_cursor)

        return services.database.read_through(("genomes", owner, persona_id, base_model, layer_id, archived, limit, cursor), load)

    @patch("/{genome_id:str}", operation_id="updateGenome", sync_to_thread=False)
    def update(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str],
        data: JSONBody[GenomeUpdate],
    ) -> Response[Genome]:
        """Rename or describe; honours If-Match."""
        return self._execute(request, services, genome_id, domain.ChangeGenomeDetails(data.name, data.description))

    @put("/{genome_id:str}/layers", operation_id="replaceLayerStack", sync_to_thread=False)
    def replace_layers(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str],
        data: JSONBody[LayerStack],
    ) -> Response[Genome]:
        """Set the whole ordered, weighted stack (index 0 at the bottom) in one atomic change."""
        caller = caller_of(request)
        visible_row(services, TABLE, "genome_id", genome_id, caller, "genome", archived_column=None)
        stack = tuple((_layer_facts(services, item.layer_id, caller), item.weight) for item in data.layers)
        return self._execute(request, services, genome_id, domain.ReplaceLayerStack(stack))

    @post("/{genome_id:str}/layers", operation_id="attachLayer", status_code=200, sync_to_thread=False)
    def attach_layer(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str],
        data: JSONBody[LayerAttachment],
    ) -> Response[Genome]:
        """Attach a layer with a weight, on top or at a position."""
        caller = caller_of(request)
        visible_row(services, TABLE, "genome_id", genome_id, caller, "genome", archived_column=None)
        facts = _layer_facts(services, data.layer_id, caller)
        return self._execute(request, services, genome_id, domain.AttachLayer(facts, data.weight, data.position))

    @delete("/{genome_id:str}/layers/{layer_id:str}", operation_id="detachLayer", status_code=200, sync_to_thread=False)
    def detach_layer(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str],
        layer_id: FromPath[str],
    ) -> Response[Genome]:
        """Take a layer off the stack."""
        return self._execute(request, services, genome_id, domain.DetachLayer(layer_id))

    @delete("/{genome_id:str}", operation_id="archiveGenome", status_code=HTTP_204_NO_CONTENT, sync_to_thread=False)
    def archive(self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str]) -> None:
        """Archive: the genome stops changing, GET answers 410, its history stays."""
        self._execute(request, services, genome_id, domain.ArchiveGenome())

    @post("/{genome_id:str}/fork", operation_id="forkGenome", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def fork(
        self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str],
        data: JSONBody[GenomeFork],
    ) -> Response[Genome]:
        """A new genome that starts from this one's stack (and other parents', first occurrence wins)."""
        caller = caller_of(request)
        parents = tuple(_visible_genome(services, pid, caller) for pid in (genome_id, *data.other_parent_ids))
        persona_id = data.persona_id or parents[0].persona_id
        _own_persona(services, persona_id, caller)
        outcome = create_stream(
            services, domain.GENOME, command_metadata(request, caller.owner, services.data_keys),
            lambda child_id: domain.ForkGenome(child_id, caller.owner, persona_id, data.name, parents, data.description),
        )
        genome = _from_aggregate(outcome.aggregate)
        return with_etag(genome, genome.version, HTTP_201_CREATED, {"Location": f"/genomes/{genome.id}"})

    @get("/{genome_id:str}/events", operation_id="genomeEvents", sync_to_thread=False)
    def events(self, request: Request[Any, Any, Any], services: NamedDependency[Services], genome_id: FromPath[str]) -> list[EventView]:
        """The genome's whole history, oldest first."""
        visible_row(services, TABLE, "genome_id", genome_id, caller_of(request), "genome", archived_column=None)
        return event_views(services.store.read_stream(genome_id))

    def _execute(self, request: Request[Any, Any, Any], services: Services, genome_id: str, command: Any) -> Response[Genome]:
        caller = caller_of(request)
        visible_row(services, TABLE, "genome_id", genome_id, caller, "genome", archived_column=None)
        outcome = services.commands.execute(
            domain.GENOME, genome_id, command,
            expected_version=expected_version(request), metadata=command_metadata(request, caller.owner, services.data_keys),
        )
        genome = _from_aggregate(outcome.aggregate)
        return with_etag(genome, genome.version)
