"""Genomes over HTTP: ordered, weighted stacks of layers on one base model, with their history."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import msgspec
from litestar import Controller, Response, delete, get, patch, post, put
from litestar.di import NamedDependency
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.status_codes import HTTP_201_CREATED, HTTP_204_NO_CONTENT

from genome_service.api.conventions import created, with_etag
from genome_service.services.context import Caller, Command
from genome_service.services.genomes import MAX_VERSION, Genome, Genomes
from genome_service.services.reads import MAX_PAGE, EventView, Page


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


def _location(genome: Genome) -> str:
    return f"/genomes/{genome.id}"


class GenomeController(Controller):
    path = "/genomes"
    tags = ["genomes"]
    genomes: Genomes

    @post("/", operation_id="createGenome", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def create(self, command: NamedDependency[Command], data: JSONBody[GenomeCreate]) -> Response[Genome]:
        """Create an empty genome for one of the caller's personas."""
        genome = self.genomes.create(command, data.persona_id, data.base_model, data.name, data.description)
        return created(genome, _location)

    @get("/{genome_id:str}", operation_id="getGenome", sync_to_thread=False)
    def read(
        self, caller: NamedDependency[Caller], genome_id: FromPath[str],
        version: Annotated[int | None, QueryParameter(ge=1, le=MAX_VERSION, description="Replay the stream up to this version.")] = None,
        as_of: Annotated[datetime | None, QueryParameter(description="Replay the stream as it was at this time (ISO 8601).")] = None,
    ) -> Response[Genome]:
        """One genome now, or as it was at a version or a time; 410 once archived."""
        genome = self.genomes.get(caller, genome_id, version=version, as_of=as_of)
        return with_etag(genome, genome.version)

    @get("/", operation_id="listGenomes", sync_to_thread=False)
    def list(
        self, caller: NamedDependency[Caller],
        persona_id: FromQuery[str | None] = None,
        base_model: FromQuery[str | None] = None,
        layer_id: Annotated[str | None, QueryParameter(description="Only genomes whose stack holds this layer.")] = None,
        archived: FromQuery[bool] = False,
        limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
        cursor: FromQuery[str | None] = None,
    ) -> Page:
        """The caller's genomes, oldest first, filtered, a page at a time."""
        return self.genomes.list(caller, persona_id=persona_id, base_model=base_model, layer_id=layer_id,
                                 archived=archived, limit=limit, cursor=cursor)

    @patch("/{genome_id:str}", operation_id="updateGenome", sync_to_thread=False)
    def update(self, command: NamedDependency[Command], genome_id: FromPath[str], data: JSONBody[GenomeUpdate]) -> Response[Genome]:
        """Rename or describe; honours If-Match."""
        genome = self.genomes.update(command, genome_id, name=data.name, description=data.description)
        return with_etag(genome, genome.version)

    @put("/{genome_id:str}/layers", operation_id="replaceLayerStack", sync_to_thread=False)
    def replace_layers(self, command: NamedDependency[Command], genome_id: FromPath[str], data: JSONBody[LayerStack]) -> Response[Genome]:
        """Set the whole ordered, weighted stack (index 0 at the bottom) in one atomic change."""
        genome = self.genomes.replace_layers(command, genome_id, [(item.layer_id, item.weight) for item in data.layers])
        return with_etag(genome, genome.version)

    @post("/{genome_id:str}/layers", operation_id="attachLayer", status_code=200, sync_to_thread=False)
    def attach_layer(self, command: NamedDependency[Command], genome_id: FromPath[str], data: JSONBody[LayerAttachment]) -> Response[Genome]:
        """Attach a layer with a weight, on top or at a position."""
        genome = self.genomes.attach_layer(command, genome_id, data.layer_id, data.weight, data.position)
        return with_etag(genome, genome.version)

    @delete("/{genome_id:str}/layers/{layer_id:str}", operation_id="detachLayer", status_code=200, sync_to_thread=False)
    def detach_layer(self, command: NamedDependency[Command], genome_id: FromPath[str], layer_id: FromPath[str]) -> Response[Genome]:
        """Take a layer off the stack."""
        genome = self.genomes.detach_layer(command, genome_id, layer_id)
        return with_etag(genome, genome.version)

    @delete("/{genome_id:str}", operation_id="archiveGenome", status_code=HTTP_204_NO_CONTENT, sync_to_thread=False)
    def archive(self, command: NamedDependency[Command], genome_id: FromPath[str]) -> None:
        """Archive: the genome stops changing, GET answers 410, its history stays."""
        self.genomes.archive(command, genome_id)

    @post("/{genome_id:str}/fork", operation_id="forkGenome", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def fork(self, command: NamedDependency[Command], genome_id: FromPath[str], data: JSONBody[GenomeFork]) -> Response[Genome]:
        """A new genome that starts from this one's stack (and other parents', first occurrence wins)."""
        genome = self.genomes.fork(command, genome_id, data.name, persona_id=data.persona_id, description=data.description,
                                   other_parent_ids=data.other_parent_ids)
        return created(genome, _location)

    @get("/{genome_id:str}/events", operation_id="genomeEvents", sync_to_thread=False)
    def events(self, caller: NamedDependency[Caller], genome_id: FromPath[str]) -> list[EventView]:
        """The genome's whole history, oldest first."""
        return self.genomes.events(caller, genome_id)
