"""Layers: LoRA adapters with their metadata. Registering validates the adapter and stores its
blobs before the event is appended; a layer is readable by its owner, and by anyone once public.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Mapping
from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa

from genome_service.domain import layer as domain
from genome_service.domain.common import DomainError
from genome_service.domain.layer import LAYER, RegisterLayer, TraitType
from genome_service.eventstore.records import EventMetadata
from genome_service.eventstore.repository import Aggregate
from genome_service.projections.queries import Row
from genome_service.projections.tables import LAYERS
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.errors import Forbidden, InvalidRequest, NotFound, Unauthorized
from genome_service.services.handler import Outcome
from genome_service.services.reads import EventView, Page, Visibility, event_views, page, visible_row
from inference.lora.adapter import parse_adapter
from rag.index import normalise

VISIBILITY = Visibility(LAYERS, "layer_id", "layer", archived=None, public="public")
# Deprecated layers are not offered for new use: search treats them as gone.
LIVE = Visibility(LAYERS, "layer_id", "layer", archived="deprecated", public="public")


class AdapterManifest(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Names an adapter's files by their blobs; its own SHA-256 is the layer's adapter reference."""

    format: str
    files: dict[str, str]


class LayerDetails(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    name: str
    base_model: str
    trait_type: TraitType
    description: str = ""
    tags: list[str] = []
    creator: str = ""
    license: str = ""
    public: bool = False
    parent_layer_id: str | None = None
    # The owner's own vector for search, instead of one embedded from the text.
    embedding: list[float] | None = None


_manifest_encoder = msgspec.json.Encoder(order="sorted")


def register_layer(
    services: Services, owner: str, details: LayerDetails, files: Mapping[str, bytes], metadata: EventMetadata,
    *, personal_of: str | None = None,
) -> Outcome[domain.Layer]:
    """Validate the adapter and the layer's rules first: a refusal leaves no blob and no event.

    `personal_of`: the persona whose personal data the adapter was trained on (the layer
    is then never public and is erased with that persona)."""
    if details.parent_layer_id is not None:
        parent = services.repository.load(LAYER, details.parent_layer_id).state
        if parent is None or (parent.owner != owner and not parent.public):
            raise DomainError("parent_layer_not_found", f"parent layer {details.parent_layer_id!r} does not exist")
    spec = services.models.get(details.base_model)
    info = parse_adapter(files, spec, max_rank=services.settings.max_lora_rank)
    manifest = AdapterManifest(info.format, {name: hashlib.sha256(data).hexdigest() for name, data in sorted(files.items())})
    manifest_bytes = _manifest_encoder.encode(manifest)
    embedding = None
    if details.embedding is not None:
        embedding = tuple(normalise(details.embedding, services.search.embedder.dimension).tolist())

    def command(layer_id: str) -> RegisterLayer:
        return RegisterLayer(
            layer_id=layer_id, owner=owner, name=details.name, base_model=spec.name,
            adapter_sha256=hashlib.sha256(manifest_bytes).hexdigest(), adapter_format=info.format, rank=info.rank,
            target_modules=info.target_modules, trait_type=details.trait_type, description=details.description,
            tags=tuple(details.tags), creator=details.creator or owner, license=details.license,
            public=details.public, parent_layer_id=details.parent_layer_id, embedding=embedding,
            personal_of=personal_of,
        )

    LAYER.decide(command("validation"), None)
    for data in files.values():
        services.blobs.put(data)
    services.blobs.put(manifest_bytes)
    return create_stream(services, LAYER, metadata, command)


def adapter_manifest(services: Services, adapter_sha256: str) -> AdapterManifest:
    return msgspec.json.decode(services.blobs.read(adapter_sha256), type=AdapterManifest)


def blob_for_daemon(services: Services, authorization: str | None, sha256: str) -> bytes:
    """An adapter blob by hash, for an inference daemon that shares no folder with this API.

    Only a caller presenting the daemon's token gets one: the daemon, which validates it.
    """
    token = services.settings.inference_token
    if not token or not hmac.compare_digest((authorization or "").encode(), f"Bearer {token}".encode()):
        raise Unauthorized("adapter blobs are served to the inference daemon only: "
                           "present `Authorization: Bearer <GENOME_INFERENCE_TOKEN>`")
    try:
        return services.blobs.read(sha256)
    except (ValueError, FileNotFoundError):
        raise NotFound("blob", sha256) from None


def erase_personal_layers(services: Services, persona_id: str, metadata: EventMetadata) -> list[str]:
    """Mark every layer trained on the persona's data erased and delete its blobs (those no other
    live layer's adapter shares, such as a common config file). The ids erased, returned."""
    with services.database.read() as connection:
        rows = list(connection.execute(sa.select(LAYERS.c.layer_id, LAYERS.c.adapter_sha256, LAYERS.c.erased)
                                       .where(LAYERS.c.personal_of == persona_id)).mappings())
        others = list(connection.execute(sa.select(LAYERS.c.adapter_sha256).where(
            sa.or_(LAYERS.c.personal_of.is_(None), LAYERS.c.personal_of != persona_id), LAYERS.c.erased.is_(False))).scalars())
    kept: set[str] = set()
    for sha256 in others:
        if services.blobs.exists(sha256):
            kept |= {sha256, *adapter_manifest(services, sha256).files.values()}
    for row in rows:
        services.commands.execute(LAYER, row["layer_id"], domain.EraseLayer(persona_id), metadata=metadata)
        if not services.blobs.exists(row["adapter_sha256"]):
            continue  # erased before
        for sha256 in {*adapter_manifest(services, row["adapter_sha256"]).files.values(), row["adapter_sha256"]} - kept:
            services.blobs.delete(sha256)
    return [row["layer_id"] for row in rows]


def adapter_file(services: Services, adapter_sha256: str, which: str) -> tuple[str, bytes]:
    """One file of an adapter by role (``weights`` or ``config``) or by its name."""
    manifest = adapter_manifest(services, adapter_sha256)
    for name, sha256 in manifest.files.items():
        role = "config" if name.endswith(".json") else "weights"
        if which in (role, name):
            return name, services.blobs.read(sha256)
    raise KeyError(which)




class Layer(msgspec.Struct, frozen=True):
    id: str
    owner: str
    name: str
    description: str
    base_model: str
    adapter_sha256: str
    adapter_format: str
    rank: int
    target_modules: list[str]
    trait_type: str
    tags: list[str]
    creator: str
    license: str
    public: bool
    parent_layer_id: str | None
    training_metrics: dict[str, Any] | None
    deprecated: bool
    deprecation_reason: str
    version: int
    created_at: datetime
    updated_at: datetime
    # The persona whose knowledge it was trained on: never public, erased with that persona.
    personal_of: str | None = None
    erased: bool = False


def _from_fields(fields: dict[str, Any], version: int, created_at: datetime, updated_at: datetime) -> Layer:
    fields = {**fields, "id": fields.pop("layer_id"), "version": version, "created_at": created_at, "updated_at": updated_at}
    return msgspec.convert(fields, Layer)


def _from_aggregate(aggregate: Aggregate[domain.Layer]) -> Layer:
    assert aggregate.state is not None and aggregate.created_at and aggregate.updated_at
    return _from_fields(msgspec.to_builtins(aggregate.state), aggregate.version, aggregate.created_at, aggregate.updated_at)


def layer_from_row(row: Row) -> Layer:
    fields = {k: v for k, v in row.items() if k not in ("version", "created_at", "updated_at")}
    return _from_fields(fields, row["version"], row["created_at"], row["updated_at"])


def _decoded_details(raw: object) -> LayerDetails:
    if not isinstance(raw, str):
        raise InvalidRequest("the multipart body needs a `metadata` part holding the layer's JSON details")
    try:
        return msgspec.json.decode(raw, type=LayerDetails)
    except msgspec.DecodeError as error:
        raise InvalidRequest(f"metadata: {error}") from error


class Layers:
    def __init__(self, services: Services) -> None:
        self.services = services

    # Reads
    def readable(self, caller: Caller, layer_id: str) -> Row:
        """The layer's row if the caller owns it or it is public (deprecated ones included)."""
        return visible_row(self.services, VISIBILITY, layer_id, caller)

    def get(self, caller: Caller, layer_id: str) -> Layer:
        return layer_from_row(self.readable(caller, layer_id))

    def list(
        self, caller: Caller, *, trait_type: str | None = None, tag: str | None = None, base_model: str | None = None,
        creator: str | None = None, public: bool | None = None, deprecated: bool = False, limit: int = 50,
        cursor: str | None = None,
    ) -> Page:
        """Layers the caller may see (its own and public ones), filtered, a page at a time."""
        owner = caller.owner

        def load(_connection: object) -> Page:
            where = [sa.or_(LAYERS.c.owner == owner, LAYERS.c.public.is_(True)), LAYERS.c.deprecated == deprecated]
            for column, value in (("trait_type", trait_type), ("base_model", base_model), ("creator", creator), ("public", public)):
                if value is not None:
                    where.append(LAYERS.c[column] == value)
            if tag is not None:
                where.append(self._has_tag(tag.strip().lower()))
            rows, next_cursor = page(self.services, LAYERS, "layer_id", where, cursor, limit)
            return Page([layer_from_row(row) for row in rows], next_cursor)

        key = ("layers", owner, trait_type, tag, base_model, creator, public, deprecated, limit, cursor)
        return self.services.database.read_through(key, load)

    def adapter(self, caller: Caller, layer_id: str, which: str) -> tuple[str, bytes]:
        """One file of the layer's adapter, exactly as uploaded: (file name, bytes)."""
        row = self.readable(caller, layer_id)
        if row["erased"]:
            raise NotFound("adapter", layer_id)  # deleted with the persona whose data it carried
        return adapter_file(self.services, row["adapter_sha256"], which)

    def events(self, caller: Caller, layer_id: str) -> list[EventView]:
        self.readable(caller, layer_id)
        return event_views(self.services.store.read_stream(layer_id))

    def _has_tag(self, tag: str) -> sa.ColumnElement[bool]:
        # Tags are a JSON list: PostgreSQL tests containment on jsonb, SQLite scans json_each.
        if self.services.database.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import JSONB

            return sa.cast(LAYERS.c.tags, JSONB).contains([tag])
        each = sa.func.json_each(LAYERS.c.tags).table_valued("value")
        return sa.exists(sa.select(1).select_from(each).where(each.c.value == tag))

    # Commands
    def register(self, command: Command, raw_details: object, files: Mapping[str, bytes]) -> Layer:
        """Register a layer from its JSON details and its adapter files (mlx-lm or PEFT layout)."""
        details = _decoded_details(raw_details)
        return _from_aggregate(register_layer(self.services, command.owner, details, files, command.metadata).aggregate)

    def update(
        self, command: Command, layer_id: str, *, description: str | None = None, tags: list[str] | None = None,
        public: bool | None = None, license: str | None = None,
    ) -> Layer:
        change = domain.ChangeLayerDetails(description, tuple(tags) if tags is not None else None, public, license)
        return self._execute(command, layer_id, change)

    def deprecate(self, command: Command, layer_id: str, reason: str = "") -> Layer:
        """Genomes that hold it keep it, but it can no longer be attached."""
        return self._execute(command, layer_id, domain.DeprecateLayer(reason))

    def _execute(self, command: Command, layer_id: str, change: object) -> Layer:
        if self.readable(command.caller, layer_id)["owner"] != command.owner:
            raise Forbidden("a public layer can be changed only by its owner")
        outcome = self.services.commands.execute(
            LAYER, layer_id, change, expected_version=command.expected_version, metadata=command.metadata,
        )
        return _from_aggregate(outcome.aggregate)
