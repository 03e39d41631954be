"""Registering layers: validate the adapter, store its blobs, then append the event."""

from __future__ import annotations

import hashlib
from collections.abc import Mapping

import msgspec

from genome_service.domain.common import DomainError
from genome_service.domain.layer import LAYER, Layer, RegisterLayer, TraitType
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services
from genome_service.services.creation import create_stream
from genome_service.services.handler import Outcome
from inference.lora.adapter import parse_adapter
from rag.index import normalise


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


def register_layer(services: Services, owner: str, details: LayerDetails, files: Mapping[str, bytes], metadata: EventMetadata) -> Outcome[Layer]:
    """Validate the adapter and the layer's rules first: a refusal leaves no blob and no event."""
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
        )

    LAYER.decide(command("validation"), None)
    for data in files.values():
        services.blobs.put(data)
    services.blobs.put(manifest_bytes)
    return create_stream(services, LAYER, metadata, command)


def adapter_manifest(services: Services, adapter_sha256: str) -> AdapterManifest:
    return msgspec.json.decode(services.blobs.read(adapter_sha256), type=AdapterManifest)


def adapter_file(services: Services, adapter_sha256: str, which: str) -> tuple[str, bytes]:
    """One file of an adapter by role (``weights`` or ``config``) or by its name."""
    manifest = adapter_manifest(services, adapter_sha256)
    for name, sha256 in manifest.files.items():
        role = "config" if name.endswith(".json") else "weights"
        if which in (role, name):
            return name, services.blobs.read(sha256)
    raise KeyError(which)


