"""Wires the service's parts from one Settings object; the only place that does."""

from __future__ import annotations

import typing

import msgspec

from genome_service.eventstore.codec import EventCodec
from genome_service.eventstore.data_keys import DataKeys
from genome_service.eventstore.database import Database
from genome_service.eventstore.repository import Repository
from genome_service.eventstore.sealing import Sealer
from genome_service.eventstore.store import EventStore
from genome_service.projections.projector import Projector
from genome_service.projections.read_models import READ_MODELS
from genome_service.services.blobs import BlobStore
from genome_service.services.handler import CommandHandler
from genome_service.services.keys import KeyStore
from genome_service.services.personal_data import PERSONAL_FIELDS, PERSONAL_STREAM_TYPES
from genome_service.services.indexes import SearchIndexes
from genome_service.settings import Settings
from inference.models import ModelCatalog
from rag.embedder import Embedder, SentenceTransformerEmbedder


def domain_codec() -> EventCodec:
    """A codec for every event of every aggregate (no upcasters yet: all events are v1)."""
    return EventCodec(t for model in READ_MODELS for t in typing.get_args(model.decider.event_type))


class Services(msgspec.Struct, frozen=True):
    settings: Settings
    database: Database
    store: EventStore
    repository: Repository
    projector: Projector
    commands: CommandHandler
    keys: KeyStore
    data_keys: DataKeys
    blobs: BlobStore
    models: ModelCatalog
    search: SearchIndexes

    def close(self) -> None:
        self.search.save_if_changed()
        self.database.dispose()


def build(
    settings: Settings, *, database: Database | None = None, inline_projections: bool = True, embedder: Embedder | None = None,
) -> Services:
    """``embedder``: one already loaded (tests share one); default: the bundled model, loaded on first use."""
    database = database or Database.from_settings(settings)
    data_keys = DataKeys(database, settings.resolved_master_key_file)
    store = EventStore(database, domain_codec(), Sealer(data_keys, PERSONAL_FIELDS))
    repository = Repository(store, snapshot_every=settings.snapshot_every, never_snapshot=PERSONAL_STREAM_TYPES)
    projector = Projector(repository, READ_MODELS, keys=data_keys)
    commands = CommandHandler(repository, projector if inline_projections else None)
    embedder = embedder or SentenceTransformerEmbedder(batch_size=settings.embed_batch_size, cache_size=settings.embed_cache_size)
    return Services(
        settings, database, store, repository, projector, commands, KeyStore(database), data_keys,
        BlobStore(settings.resolved_blob_dir), ModelCatalog(settings.resolved_models_dir),
        SearchIndexes(repository, embedder, settings),
    )
