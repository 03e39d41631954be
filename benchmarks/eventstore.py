"""Event store throughput: our store against the ``eventsourcing`` library, in one process.

    .venv/bin/python benchmarks/eventstore.py [--quick] [--postgres-url URL] [--no-postgres]
                                              [--profile {append,append10,load,rebuild}]

Workloads (each side on its own fresh database; SQLite: its own file in a temp dir,
PostgreSQL: its own schema, dropped at the end):

- append: single-event appends, to fresh streams (ours: ``Expect.NO_STREAM``) and to
  existing streams with an exact expected version. ``append_ratio`` is ours / theirs
  on the combined rate (equal numbers of both kinds); the two parts are reported too.
- append10: atomic 10-event appends to existing streams, exact expected version.
- load: rebuild one 1,000-event genome from its stream, snapshots off on both sides.
  ``load_ratio`` is THEIR time / OUR time.
- rebuild: ``Projector.rebuild()`` over a log of mixed persona/layer/genome events
  (SQLite, ours only): ``rebuild_events_per_s``.

The comparison level on their side is ``Application.events.put()`` (their
``EventStore`` with the ``Mapper``/``JSONTranscoder`` an ``Application`` builds, over
their ``ApplicationRecorder``) for appends, and ``Application.repository.get()`` for
loads; see ``COMPARISON`` below for why. Runs are interleaved (ours, theirs, theirs,
ours, ...) so that drift hits both sides alike; each figure is the median of the runs.

The last line of stdout is one JSON object with the headline figures; the full
results go to ``benchmarks/results/eventstore-<UTC timestamp>.json``.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import sqlite3
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

# The project root takes this folder's place on sys.path: a benchmark named like a package
# (inference.py) would shadow it.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from benchmarks import _harness as harness  # noqa: E402
import sqlalchemy as sa  # noqa: E402
from eventsourcing.application import Application  # noqa: E402
from eventsourcing.domain import Aggregate as ESAggregate  # noqa: E402
from eventsourcing.persistence import InfrastructureFactory  # noqa: E402
from eventsourcing.sqlite import SQLiteConnection, SQLiteConnectionPool, SQLiteFactory  # noqa: E402
from eventsourcing.utils import get_topic  # noqa: E402

from genome_service.domain.genome import (  # noqa: E402
    GENOME,
    GenomeCreated,
    LayerAttached,
    LayerDetached,
    LayerReweighted,
    LayersReordered,
)
from genome_service.domain.layer import (  # noqa: E402
    LayerDetailsChanged,
    LayerRegistered,
    TrainingMetrics,
    TrainingMetricsRecorded,
    TraitType,
)
from genome_service.domain.persona import (  # noqa: E402
    GenomeAssigned,
    PersonaCreated,
    PersonaProfileChanged,
)
from genome_service.eventstore.migrations import upgrade  # noqa: E402
from genome_service.eventstore.records import Expect  # noqa: E402
from genome_service.services.bootstrap import Services, build  # noqa: E402
from genome_service.settings import Settings  # noqa: E402

DEFAULT_POSTGRES_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"
SQLITE_JOURNAL_MODE = "WAL"
SQLITE_SYNCHRONOUS = "NORMAL"  # our default (Settings.sqlite_synchronous); theirs is set to match
PACKAGES = ("sqlalchemy", "msgspec", "eventsourcing", "psycopg", "psycopg-binary", "alembic", "sqlmodel", "rich")

COMPARISON = {
    "append": (
        "ours: EventStore.append(stream_id, 'genome', [event], expected) with a msgspec domain event "
        "(GenomeCreated to a fresh stream with Expect.NO_STREAM; LayerAttached to an existing stream "
        "with its exact version). theirs: Application.events.put([event]), i.e. "
        "eventsourcing.persistence.EventStore.put -> Mapper.to_stored_event (JSONTranscoder with the "
        "UUID/Decimal/datetime transcodings an Application registers) -> ApplicationRecorder.insert_events, "
        "with an equivalent Aggregate.Event (same payload fields plus their originator_id/version/timestamp). "
        "Both build the event object in the timed loop, serialise it and go through the public storage "
        "API in one transaction of their own. Their optimistic-concurrency check is the "
        "(originator_id, originator_version) primary key; ours reads the stream head first. "
        "Application.save() was not used: it also mutates/collects aggregate events and runs notify "
        "hooks, which corresponds to our CommandHandler.execute, not to EventStore.append."
    ),
    "append10": "as append, with 10 events per call (one atomic batch) to existing streams.",
    "load": (
        "ours: Repository.load(GENOME, id, use_snapshot=False) (read the stream, decode, fold with the "
        "domain's evolve, immutable msgspec state). theirs: Application.repository.get(id) on an "
        "Application without snapshotting and without an aggregate cache (read, Mapper.to_domain_event, "
        "event.mutate on an eventsourcing Aggregate with the same fields and the same "
        "attach/reweight/detach semantics, mutable list state). Both stacks replay the same 1,000 events; "
        "the final layer stacks are checked equal."
    ),
    "rebuild": (
        "ours only: Projector.rebuild() (clear read models, read the whole log in batches, fold every "
        "stream, upsert rows, one transaction) on SQLite; events/s = log length / wall time."
    ),
}


@dataclass(frozen=True)
class Scale:
    append_n: int  # single-event appends per run, per kind (fresh / existing)
    append10_batches: int
    load_count: int  # loads per run
    load_events: int
    rebuild_events: int
    runs: int
    existing_streams: int


QUICK = Scale(append_n=3000, append10_batches=1000, load_count=20, load_events=1000,
              rebuild_events=20_000, runs=5, existing_streams=100)
FULL = Scale(append_n=8000, append10_batches=3000, load_count=60, load_events=1000,
             rebuild_events=100_000, runs=7, existing_streams=300)
# A PostgreSQL commit waits for its WAL flush (~1 ms here): fewer appends per run there.
PG_FACTOR = 0.25


# ---------------------------------------------------------------------------
# Their side: an eventsourcing aggregate with the genome's fields and events.
# ---------------------------------------------------------------------------
class ESGenome(ESAggregate):
    class Created(ESAggregate.Created):
        genome_id: str
        owner: str
        persona_id: str
        base_model: str
        name: str
        description: str

    def __init__(self, genome_id: str, owner: str, persona_id: str, base_model: str, name: str, description: str):
        self.genome_id = genome_id
        self.owner = owner
        self.persona_id = persona_id
        self.base_model = base_model
        self.name = name
        self.description = description
        self.layers: list[tuple[str, float]] = []
        self.archived = False

    class LayerAttached(ESAggregate.Event):
        layer_id: str
        weight: float
        position: int

        def apply(self, aggregate: ESGenome) -> None:
            aggregate.layers.insert(self.position, (self.layer_id, self.weight))

    class LayerReweighted(ESAggregate.Event):
        layer_id: str
        weight: float

        def apply(self, aggregate: ESGenome) -> None:
            aggregate.layers = [
                (layer_id, self.weight) if layer_id == self.layer_id else (layer_id, weight)
                for layer_id, weight in aggregate.layers
            ]

    class LayerDetached(ESAggregate.Event):
        layer_id: str

        def apply(self, aggregate: ESGenome) -> None:
            aggregate.layers = [ref for ref in aggregate.layers if ref[0] != self.layer_id]


ES_GENOME_TOPIC = get_topic(ESGenome)
_es_now = ESAggregate.Event.create_timestamp


class _SyncPool(SQLiteConnectionPool):
    """Their SQLite pool, with the same ``synchronous`` setting as ours on every connection."""

    synchronous = SQLITE_SYNCHRONOUS

    def _create_connection(self) -> SQLiteConnection:
        connection = super()._create_connection()  # sets journal_mode=WAL for file databases
        connection._sqlite_conn.execute(f"PRAGMA synchronous={self.synchronous}")
        return connection


class _SyncSQLiteFactory(SQLiteFactory):
    def __init__(self, env: Any) -> None:
        super().__init__(env)
        old = self.datastore.pool
        self.datastore.pool = _SyncPool(db_name=old.db_name, lock_timeout=old.lock_timeout)
        old.close()


class ESApp(Application):
    """A plain Application (no snapshotting, no aggregate cache) on the given infrastructure."""

    name = "BenchApp"
    factory_class: type[InfrastructureFactory] = _SyncSQLiteFactory

    def construct_factory(self, env: Any) -> InfrastructureFactory:
        return self.factory_class(env)


class _ESPostgresApp(ESApp):
    def construct_factory(self, env: Any) -> InfrastructureFactory:
        from eventsourcing.postgres import PostgresFactory

        return PostgresFactory(env)


# ---------------------------------------------------------------------------
# Shared workload data
# ---------------------------------------------------------------------------
BASE_MODELS = ("llama-3.1-8b", "qwen2.5-7b", "mistral-7b")


def genome_fields(genome_id: str, i: int) -> dict[str, str]:
    return {
        "genome_id": genome_id,
        "owner": f"user-{i % 97}",
        "persona_id": f"persona-{i % 89}",
        "base_model": BASE_MODELS[i % 3],
        "name": f"Genome {i}",
        "description": "A benchmark genome of stacked LoRA layers",
    }


def layer_id(i: int) -> str:
    return f"layer-{i:08d}"


def load_ops(count: int, seed: int = 7) -> list[tuple[Any, ...]]:
    """``count`` attach/reweight/detach operations on one genome, never more than 12 layers."""
    rng = random.Random(seed)
    attached: list[str] = []
    next_layer = 0
    ops: list[tuple[Any, ...]] = []
    for _ in range(count):
        roll = rng.random()
        if not attached or (roll < 0.35 and len(attached) < 12):
            lid = layer_id(next_layer)
            next_layer += 1
            position = rng.randint(0, len(attached))
            attached.insert(position, lid)
            ops.append(("attach", lid, round(rng.random(), 3), position))
        elif roll < 0.85:
            ops.append(("reweight", rng.choice(attached), round(rng.random(), 3)))
        else:
            lid = rng.choice(attached)
            attached.remove(lid)
            ops.append(("detach", lid))
    return ops


def expected_layers(ops: list[tuple[Any, ...]]) -> list[tuple[str, float]]:
    layers: list[tuple[str, float]] = []
    for op in ops:
        if op[0] == "attach":
            layers.insert(op[3], (op[1], op[2]))
        elif op[0] == "reweight":
            layers = [(lid, op[2] if lid == op[1] else w) for lid, w in layers]
        else:
            layers = [(lid, w) for lid, w in layers if lid != op[1]]
    return layers


# ---------------------------------------------------------------------------
# The two sides, behind one small interface
# ---------------------------------------------------------------------------
class Side:
    name: str

    def prepare(self, scale: Scale) -> None: ...
    def append_fresh(self, n: int) -> None: ...
    def append_existing(self, n: int) -> None: ...
    def append_batches(self, batches: int, size: int) -> None: ...
    def seed_load_stream(self, ops: list[tuple[Any, ...]]) -> Any: ...
    def load(self, stream_id: Any) -> tuple[int, list[tuple[str, float]]]: ...
    def event_count(self) -> int: ...
    def settings(self) -> dict[str, Any]: ...
    def close(self) -> None: ...


class Ours(Side):
    name = "ours"

    def __init__(self, url: str, data_dir: Path) -> None:
        self.url = url
        self.services: Services = build(Settings(data_dir=data_dir, database_url=url))
        self.store = self.services.store
        self.repository = self.services.repository
        self.versions: dict[str, int] = {}
        self._existing: list[str] = []
        self._cursor = 0
        self._serial = 0

    def prepare(self, scale: Scale) -> None:
        for _ in range(scale.existing_streams):
            stream_id = self._new_id()
            self.store.append(stream_id, "genome", [GenomeCreated(**genome_fields(stream_id, self._serial))],
                              Expect.NO_STREAM)
            self.versions[stream_id] = 1
            self._existing.append(stream_id)

    def _new_id(self) -> str:
        self._serial += 1
        return str(uuid.uuid4())

    def _next_existing(self) -> str:
        stream_id = self._existing[self._cursor % len(self._existing)]
        self._cursor += 1
        return stream_id

    def append_fresh(self, n: int) -> None:
        append = self.store.append
        for _ in range(n):
            stream_id = self._new_id()
            append(stream_id, "genome", [GenomeCreated(**genome_fields(stream_id, self._serial))], Expect.NO_STREAM)

    def append_existing(self, n: int) -> None:
        append, versions = self.store.append, self.versions
        for _ in range(n):
            stream_id = self._next_existing()
            version = versions[stream_id]
            append(stream_id, "genome", [LayerAttached(layer_id(version), 0.5, 0)], version)
            versions[stream_id] = version + 1

    def append_batches(self, batches: int, size: int) -> None:
        append, versions = self.store.append, self.versions
        for _ in range(batches):
            stream_id = self._next_existing()
            version = versions[stream_id]
            events = [LayerAttached(layer_id(version + k), 0.5, 0) for k in range(size)]
            append(stream_id, "genome", events, version)
            versions[stream_id] = version + size

    def seed_load_stream(self, ops: list[tuple[Any, ...]]) -> str:
        stream_id = self._new_id()
        events: list[Any] = [GenomeCreated(**genome_fields(stream_id, 0))]
        for op in ops:
            if op[0] == "attach":
                events.append(LayerAttached(op[1], op[2], op[3]))
            elif op[0] == "reweight":
                events.append(LayerReweighted(op[1], op[2]))
            else:
                events.append(LayerDetached(op[1]))
        version = 0
        for start in range(0, len(events), 100):
            chunk = events[start:start + 100]
            self.store.append(stream_id, "genome", chunk, version or Expect.NO_STREAM)
            version += len(chunk)
        return stream_id

    def load(self, stream_id: str) -> tuple[int, list[tuple[str, float]]]:
        aggregate = self.repository.load(GENOME, stream_id, use_snapshot=False)
        return aggregate.version, [(ref.layer_id, ref.weight) for ref in aggregate.state.layers]

    def event_count(self) -> int:
        return self.store.last_position()

    def settings(self) -> dict[str, Any]:
        db = self.services.database
        out: dict[str, Any] = {
            "level": "genome_service.eventstore.EventStore.append / Repository.load(use_snapshot=False)",
            "pool": "SQLAlchemy QueuePool(pool_size=8, max_overflow=32)"
            + (", pool_pre_ping=True" if db.dialect == "postgresql" else ""),
        }
        if db.dialect == "sqlite":
            with db.write_engine.connect() as connection:
                out["journal_mode"] = connection.exec_driver_sql("PRAGMA journal_mode").scalar()
                out["synchronous"] = _sync_name(connection.exec_driver_sql("PRAGMA synchronous").scalar())
            out["write_transactions"] = "BEGIN IMMEDIATE"
        return out

    def close(self) -> None:
        self.services.close()


class Theirs(Side):
    name = "eventsourcing"

    def __init__(self, app: ESApp) -> None:
        self.app = app
        self.put = app.events.put
        self.versions: dict[uuid.UUID, int] = {}
        self._existing: list[uuid.UUID] = []
        self._cursor = 0
        self._serial = 0

    def prepare(self, scale: Scale) -> None:
        for _ in range(scale.existing_streams):
            originator_id = uuid.uuid4()
            self._serial += 1
            self.put([self._created(originator_id, self._serial)])
            self.versions[originator_id] = 1
            self._existing.append(originator_id)

    @staticmethod
    def _created(originator_id: uuid.UUID, i: int) -> ESGenome.Created:
        return ESGenome.Created(originator_id=originator_id, originator_version=1, timestamp=_es_now(),
                                originator_topic=ES_GENOME_TOPIC, **genome_fields(str(originator_id), i))

    def _next_existing(self) -> uuid.UUID:
        originator_id = self._existing[self._cursor % len(self._existing)]
        self._cursor += 1
        return originator_id

    def append_fresh(self, n: int) -> None:
        put, created = self.put, self._created
        for _ in range(n):
            self._serial += 1
            put([created(uuid.uuid4(), self._serial)])

    def append_existing(self, n: int) -> None:
        put, versions, attached = self.put, self.versions, ESGenome.LayerAttached
        for _ in range(n):
            originator_id = self._next_existing()
            version = versions[originator_id]
            put([attached(originator_id=originator_id, originator_version=version + 1, timestamp=_es_now(),
                          layer_id=layer_id(version), weight=0.5, position=0)])
            versions[originator_id] = version + 1

    def append_batches(self, batches: int, size: int) -> None:
        put, versions, attached = self.put, self.versions, ESGenome.LayerAttached
        for _ in range(batches):
            originator_id = self._next_existing()
            version = versions[originator_id]
            put([attached(originator_id=originator_id, originator_version=version + k + 1, timestamp=_es_now(),
                          layer_id=layer_id(version + k), weight=0.5, position=0) for k in range(size)])
            versions[originator_id] = version + size

    def seed_load_stream(self, ops: list[tuple[Any, ...]]) -> uuid.UUID:
        originator_id = uuid.uuid4()
        events: list[Any] = [self._created(originator_id, 0)]
        for version, op in enumerate(ops, start=2):
            common = {"originator_id": originator_id, "originator_version": version, "timestamp": _es_now()}
            if op[0] == "attach":
                events.append(ESGenome.LayerAttached(**common, layer_id=op[1], weight=op[2], position=op[3]))
            elif op[0] == "reweight":
                events.append(ESGenome.LayerReweighted(**common, layer_id=op[1], weight=op[2]))
            else:
                events.append(ESGenome.LayerDetached(**common, layer_id=op[1]))
        for start in range(0, len(events), 100):
            self.put(events[start:start + 100])
        return originator_id

    def load(self, originator_id: uuid.UUID) -> tuple[int, list[tuple[str, float]]]:
        genome = self.app.repository.get(originator_id)
        return genome.version, list(genome.layers)

    def event_count(self) -> int:
        return self.app.recorder.max_notification_id() or 0

    def settings(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "level": "Application.events.put (EventStore.put on ApplicationRecorder) / Application.repository.get",
            "recorder": type(self.app.recorder).__name__,
            "transcoder": type(self.app.mapper.transcoder).__name__,
            "snapshotting": self.app.snapshots is not None,
            "aggregate_cache": self.app.repository.cache is not None,
        }
        datastore = self.app.factory.datastore  # type: ignore[attr-defined]
        if isinstance(self.app.factory, SQLiteFactory):
            with datastore.transaction(commit=False) as cursor:
                cursor.execute("PRAGMA journal_mode")
                out["journal_mode"] = cursor.fetchone()[0]
                cursor.execute("PRAGMA synchronous")
                out["synchronous"] = _sync_name(cursor.fetchone()[0])
            out["write_transactions"] = "BEGIN (deferred)"
            out["pool"] = "eventsourcing SQLiteConnectionPool(pool_size=5, max_overflow=10)"
        else:
            out["pool"] = (f"psycopg_pool min_size={datastore.pool.min_size} max_size={datastore.pool.max_size}, "
                           f"pre_ping={datastore.pre_ping}")
            out["schema"] = datastore.schema
        return out

    def close(self) -> None:
        self.app.close()


def _sync_name(value: Any) -> str:
    return {0: "OFF", 1: "NORMAL", 2: "FULL", 3: "EXTRA"}.get(value, str(value))


# ---------------------------------------------------------------------------
# Backends: where each side's fresh database comes from
# ---------------------------------------------------------------------------
class SQLiteBackend:
    name = "sqlite"

    def __init__(self, root: Path) -> None:
        self.root = root

    def ours(self, label: str) -> Ours:
        directory = self.root / f"ours-{label}"
        directory.mkdir()
        url = f"sqlite:///{directory / 'genome.db'}"
        upgrade(url)
        return Ours(url, directory)

    def theirs(self, label: str) -> Theirs:
        directory = self.root / f"es-{label}"
        directory.mkdir()
        return Theirs(ESApp(env={"SQLITE_DBNAME": str(directory / "es.db"), "CREATE_TABLE": "y"}))

    def close(self) -> None:
        pass


class PostgresBackend:
    name = "postgresql"

    def __init__(self, url: str, root: Path) -> None:
        self.url = sa.engine.make_url(url)
        self.root = root
        self.admin = sa.create_engine(url, isolation_level="AUTOCOMMIT")
        self.schemas: list[str] = []

    def _schema(self, prefix: str) -> str:
        schema = f"bench_{prefix}_{uuid.uuid4().hex[:10]}"
        with self.admin.connect() as connection:
            connection.exec_driver_sql(f"CREATE SCHEMA {schema}")
        self.schemas.append(schema)
        return schema

    def ours(self, label: str) -> Ours:
        schema = self._schema("ours")
        url = self.url.update_query_dict({"options": f"-csearch_path={schema}"}).render_as_string(hide_password=False)
        upgrade(url)
        directory = self.root / f"pg-ours-{label}"
        directory.mkdir()
        return Ours(url, directory)

    def theirs(self, label: str) -> Theirs:
        schema = self._schema("es")
        env = {
            "POSTGRES_DBNAME": self.url.database or "postgres",
            "POSTGRES_HOST": self.url.host or "127.0.0.1",
            "POSTGRES_PORT": str(self.url.port or 5432),
            "POSTGRES_USER": self.url.username or "postgres",
            "POSTGRES_PASSWORD": self.url.password or "",
            "POSTGRES_SCHEMA": schema,
            "CREATE_TABLE": "y",
        }
        return Theirs(_ESPostgresApp(env=env))

    def server_settings(self) -> dict[str, Any]:
        names = ("server_version", "synchronous_commit", "fsync", "wal_sync_method", "shared_buffers")
        with self.admin.connect() as connection:
            return {name: connection.exec_driver_sql(f"SHOW {name}").scalar() for name in names}

    def close(self) -> None:
        with self.admin.connect() as connection:
            for schema in self.schemas:
                connection.exec_driver_sql(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
        self.admin.dispose()


def postgres_problem(url: str) -> str | None:
    try:
        import psycopg_pool  # noqa: F401 - eventsourcing.postgres imports it
    except ImportError:
        return ("eventsourcing.postgres needs psycopg_pool, which is not installed "
                "(pip install 'psycopg-pool' or 'eventsourcing[postgres]')")
    try:
        engine = sa.create_engine(url, connect_args={"connect_timeout": 3})
        with engine.connect():
            pass
        engine.dispose()
        return None
    except Exception as exc:  # noqa: BLE001 - any failure means "not reachable"
        return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------
def interleaved(runs: int, sides: list[Side], work: Callable[[Side], float]) -> dict[str, list[float]]:
    """Run ``work`` ``runs`` times per side, alternating the order, and collect its results."""
    results: dict[str, list[float]] = {side.name: [] for side in sides}
    for run in range(runs):
        order = sides if run % 2 == 0 else list(reversed(sides))
        for side in order:
            results[side.name].append(work(side))
    return results


def figure(per_run: dict[str, list[float]], unit: str, *, higher_is_better: bool, count: int) -> dict[str, Any]:
    ours, theirs = harness.median(per_run["ours"]), harness.median(per_run["eventsourcing"])
    ratio = ours / theirs if higher_is_better else theirs / ours
    return {
        "ours": ours,
        "eventsourcing": theirs,
        "unit": unit,
        "ratio": ratio,
        "per_run": per_run,
        "count_per_run": count,
    }


def bench_backend(backend: SQLiteBackend | PostgresBackend, scale: Scale, root_label: str) -> dict[str, Any]:
    ours, theirs = backend.ours(root_label), backend.theirs(root_label)
    sides: list[Side] = [ours, theirs]
    out: dict[str, Any] = {}
    try:
        for side in sides:
            side.prepare(scale)
        # Warm-up: every code path once, pools filled, statements cached.
        for side in sides:
            side.append_fresh(max(50, scale.append_n // 10))
            side.append_existing(max(50, scale.append_n // 10))
            side.append_batches(max(10, scale.append10_batches // 10), 10)

        n = scale.append_n

        def fresh(side: Side) -> float:
            return harness.rate(n, harness.timed(lambda: side.append_fresh(n)))

        def existing(side: Side) -> float:
            return harness.rate(n, harness.timed(lambda: side.append_existing(n)))

        harness.log(f"  [{backend.name}] append: {scale.runs} runs x {n} fresh + {n} existing single-event appends")
        fresh_runs = interleaved(scale.runs, sides, fresh)
        existing_runs = interleaved(scale.runs, sides, existing)
        parts = {"fresh": figure(fresh_runs, "events/s", higher_is_better=True, count=n),
                 "existing": figure(existing_runs, "events/s", higher_is_better=True, count=n)}
        # Equal numbers of both kinds: the combined rate is the harmonic mean of the two medians.
        combined = {name: 2 / (1 / parts["fresh"][name] + 1 / parts["existing"][name])
                    for name in ("ours", "eventsourcing")}
        out["append"] = {**combined, "unit": "events/s", "ratio": combined["ours"] / combined["eventsourcing"],
                         "count_per_run": 2 * n, **parts}

        b = scale.append10_batches

        def batches(side: Side) -> float:
            return harness.rate(10 * b, harness.timed(lambda: side.append_batches(b, 10)))

        harness.log(f"  [{backend.name}] append10: {scale.runs} runs x {b} batches of 10")
        out["append10"] = figure(interleaved(scale.runs, sides, batches), "events/s", higher_is_better=True,
                                 count=10 * b)
        out["append10"]["batches_per_s"] = {k: v / 10 for k, v in
                                            (("ours", out["append10"]["ours"]),
                                             ("eventsourcing", out["append10"]["eventsourcing"]))}

        ops = load_ops(scale.load_events - 1)
        want = expected_layers(ops)
        stream_ids = {side.name: side.seed_load_stream(ops) for side in sides}
        for side in sides:  # correctness, and warm-up
            version, layers = side.load(stream_ids[side.name])
            if version != scale.load_events or layers != want:
                raise AssertionError(f"{side.name} loaded version {version} with {layers}, wanted {want}")
            for _ in range(2):
                side.load(stream_ids[side.name])
        k = scale.load_count

        def load(side: Side) -> float:
            stream_id = stream_ids[side.name]
            seconds = harness.timed(lambda: [side.load(stream_id) for _ in range(k)])
            return seconds / k * 1000

        harness.log(f"  [{backend.name}] load: {scale.runs} runs x {k} loads of a {scale.load_events}-event genome")
        out["load"] = figure(interleaved(scale.runs, sides, load), "ms per load", higher_is_better=False, count=k)
        out["load"]["events_per_s"] = {
            name: scale.load_events / (out["load"][name] / 1000) for name in ("ours", "eventsourcing")
        }
        out["load"]["snapshots"] = "off on both sides (ours: use_snapshot=False; theirs: no snapshot store)"

        # Both logs hold what was appended to them.
        counts = {side.name: side.event_count() for side in sides}
        if counts["ours"] != counts["eventsourcing"]:
            raise AssertionError(f"the two logs differ in length: {counts}")
        out["events_in_log_at_end"] = counts
        out["settings"] = {side.name: side.settings() for side in sides}
    finally:
        for side in sides:
            side.close()
    return out


# ---------------------------------------------------------------------------
# Rebuild: a realistic mixed log, then Projector.rebuild()
# ---------------------------------------------------------------------------
class MixedLog:
    """Plausible service traffic: personas, layers, genomes that attach/reweight/detach layers."""

    MAX_STACK = 12

    def __init__(self, seed: int = 11) -> None:
        self.rng = random.Random(seed)
        self.versions: dict[str, int] = {}
        self.personas: list[str] = []
        self.layers: dict[str, list[str]] = {model: [] for model in BASE_MODELS}
        self.genomes: list[tuple[str, str, list[str]]] = []  # (id, base model, attached layer ids)
        self.counts = {"persona": 0, "layer": 0, "genome": 0}

    def appends(self, total: int) -> Iterator[tuple[str, str, list[Any]]]:
        produced = 0
        while produced < total:
            stream_id, stream_type, events = self._next()
            produced += len(events)
            yield stream_id, stream_type, events

    def _next(self) -> tuple[str, str, list[Any]]:
        rng = self.rng
        roll = rng.random()
        if not self.personas or roll < 0.04:
            return self._create_persona()
        if roll < 0.12 or not any(self.layers.values()):
            return self._register_layer()
        if not self.genomes or roll < 0.18:
            return self._create_genome()
        if roll < 0.22:
            return self._persona_change()
        if roll < 0.26:
            return self._layer_change()
        genome = rng.choice(self.genomes)
        genome_id, model, attached = genome
        if roll < 0.58 and len(attached) < self.MAX_STACK:
            candidates = [lid for lid in rng.sample(self.layers[model], min(5, len(self.layers[model])))
                          if lid not in attached]
            if candidates:
                lid = candidates[0]
                position = rng.randint(0, len(attached))
                attached.insert(position, lid)
                return genome_id, "genome", [LayerAttached(lid, round(rng.random(), 3), position)]
        if attached and roll < 0.88:
            return genome_id, "genome", [LayerReweighted(rng.choice(attached), round(rng.random(), 3))]
        if len(attached) >= 2 and roll < 0.90:
            order = attached[:]
            rng.shuffle(order)
            attached[:] = order
            return genome_id, "genome", [LayersReordered(tuple(order))]
        if attached:
            lid = rng.choice(attached)
            attached.remove(lid)
            return genome_id, "genome", [LayerDetached(lid)]
        return self._register_layer()

    def _id(self, kind: str) -> str:
        self.counts[kind] += 1
        return str(uuid.UUID(int=self.rng.getrandbits(128), version=4))

    def _create_persona(self) -> tuple[str, str, list[Any]]:
        pid = self._id("persona")
        self.personas.append(pid)
        return pid, "persona", [PersonaCreated(pid, f"user-{len(self.personas) % 50}", f"Persona {len(self.personas)}",
                                               "A helpful persona", "You are a helpful assistant. " * 8)]

    def _register_layer(self) -> tuple[str, str, list[Any]]:
        lid = self._id("layer")
        model = self.rng.choice(BASE_MODELS)
        self.layers[model].append(lid)
        return lid, "layer", [LayerRegistered(
            layer_id=lid, owner=f"user-{self.rng.randrange(50)}", name=f"Layer {lid[:8]}", base_model=model,
            adapter_sha256=f"{self.rng.getrandbits(256):064x}", adapter_format="peft", rank=16,
            target_modules=("q_proj", "k_proj", "v_proj", "o_proj"),
            trait_type=self.rng.choice(list(TraitType)), description="A LoRA adapter trained for the benchmark",
            tags=("benchmark", model), creator="bench", license="apache-2.0", public=self.rng.random() < 0.5,
            training_metrics=TrainingMetrics(loss=round(self.rng.random(), 4), epochs=3, steps=1200),
        )]

    def _create_genome(self) -> tuple[str, str, list[Any]]:
        gid = self._id("genome")
        model = self.rng.choice(BASE_MODELS)
        self.genomes.append((gid, model, []))
        return gid, "genome", [GenomeCreated(gid, f"user-{self.rng.randrange(50)}", self.rng.choice(self.personas),
                                             model, f"Genome {len(self.genomes)}", "A stack for the benchmark")]

    def _persona_change(self) -> tuple[str, str, list[Any]]:
        pid = self.rng.choice(self.personas)
        if self.genomes and self.rng.random() < 0.5:
            return pid, "persona", [GenomeAssigned(self.rng.choice(self.genomes)[0])]
        return pid, "persona", [PersonaProfileChanged(description=f"Updated {self.rng.randrange(10**6)}")]

    def _layer_change(self) -> tuple[str, str, list[Any]]:
        model = self.rng.choice([m for m in BASE_MODELS if self.layers[m]])
        lid = self.rng.choice(self.layers[model])
        if self.rng.random() < 0.5:
            return lid, "layer", [TrainingMetricsRecorded(TrainingMetrics(loss=round(self.rng.random(), 4), epochs=4))]
        return lid, "layer", [LayerDetailsChanged(description=f"Revised {self.rng.randrange(10**6)}")]


def build_mixed_log(services: Services, total: int) -> dict[str, Any]:
    """Append ``total`` mixed events with inline projections off, 1,000 appends per transaction."""
    mixed = MixedLog()
    store, versions = services.store, mixed.versions
    appends = list(mixed.appends(total))
    started = time.perf_counter()
    for start in range(0, len(appends), 1000):
        with services.database.write() as connection:
            for stream_id, stream_type, events in appends[start:start + 1000]:
                version = versions.get(stream_id, 0)
                store.append_in(connection, stream_id, stream_type, events, version or Expect.NO_STREAM)
                versions[stream_id] = version + len(events)
    types: dict[str, int] = {}
    for _, _, events in appends:
        for event in events:
            types[type(event).__name__] = types.get(type(event).__name__, 0) + 1
    return {
        "events": sum(types.values()),
        "appends": len(appends),
        "streams": dict(mixed.counts),
        "event_types": dict(sorted(types.items(), key=lambda kv: -kv[1])),
        "build_seconds": time.perf_counter() - started,
        "expected_rows": {"personas": mixed.counts["persona"], "layers": mixed.counts["layer"],
                          "genomes": mixed.counts["genome"],
                          "genome_layer_refs": sum(len(g[2]) for g in mixed.genomes)},
    }


def bench_rebuild(root: Path, scale: Scale) -> dict[str, Any]:
    directory = root / "rebuild"
    directory.mkdir()
    url = f"sqlite:///{directory / 'genome.db'}"
    upgrade(url)
    services = build(Settings(data_dir=directory, database_url=url), inline_projections=False)
    try:
        harness.log(f"  [sqlite] rebuild: building a log of {scale.rebuild_events:,} mixed events")
        log_info = build_mixed_log(services, scale.rebuild_events)
        events = services.store.last_position()
        assert events == log_info["events"], (events, log_info["events"])
        services.projector.rebuild()  # warm-up (and the first build of the read models)
        runs = max(3, scale.runs - 2)
        harness.log(f"  [sqlite] rebuild: {runs} timed runs of Projector.rebuild()")
        timings = [harness.timed_with_gc(services.projector.rebuild) for _ in range(runs)]
        seconds = [t for t, _ in timings]
        with services.database.read() as connection:
            rows = {table: connection.exec_driver_sql(f"SELECT count(*) FROM {table}").scalar()
                    for table in log_info["expected_rows"]}
        if rows != log_info["expected_rows"]:
            raise AssertionError(f"rebuild wrote {rows}, expected {log_info['expected_rows']}")
        with services.database.read() as connection:
            checkpoint = connection.exec_driver_sql("SELECT position FROM projection_checkpoints").scalar()
        assert checkpoint == events, (checkpoint, events)
        rates = [events / s for s in seconds]
        return {
            "events_per_s": harness.median(rates),
            "per_run_events_per_s": rates,
            "per_run_seconds": seconds,
            # Diagnostics: how much of each rebuild was Python's cyclic garbage collector.
            "per_run_gc_seconds": [g.seconds for _, g in timings],
            "per_run_gc_collections_by_generation": [g.collections for _, g in timings],
            "gc_share_median": harness.median(g.seconds / t for t, g in timings),
            "events_per_s_excluding_gc_median": harness.median(events / (t - g.seconds) for t, g in timings),
            "log": log_info,
            "read_model_rows": rows,
            "batch_size": services.projector.batch_size,
        }
    finally:
        services.close()


# ---------------------------------------------------------------------------
# Profiling our side of one workload (for whoever makes the store faster)
# ---------------------------------------------------------------------------
def profile(workload: str, scale: Scale, root: Path) -> None:
    backend = SQLiteBackend(root)
    if workload == "rebuild":
        directory = root / "rebuild"
        directory.mkdir()
        url = f"sqlite:///{directory / 'genome.db'}"
        upgrade(url)
        services = build(Settings(data_dir=directory, database_url=url), inline_projections=False)
        build_mixed_log(services, scale.rebuild_events)
        services.projector.rebuild()
        target: Callable[[], Any] = services.projector.rebuild
        count = services.store.last_position()
    else:
        ours = backend.ours("profile")
        ours.prepare(scale)
        ours.append_fresh(100)
        ours.append_existing(100)
        if workload == "append":
            def target() -> None:
                ours.append_fresh(scale.append_n)
                ours.append_existing(scale.append_n)
            count = 2 * scale.append_n
        elif workload == "append10":
            def target() -> None:
                ours.append_batches(scale.append10_batches, 10)
            count = scale.append10_batches
        else:
            stream_id = ours.seed_load_stream(load_ops(scale.load_events - 1))
            ours.load(stream_id)

            def target() -> None:
                for _ in range(scale.load_count):
                    ours.load(stream_id)
            count = scale.load_count
    profiler = cProfile.Profile()
    profiler.enable()
    target()
    profiler.disable()
    stream = io.StringIO()
    stats = pstats.Stats(profiler, stream=stream)
    stream.write(f"# {workload}: {count} operations (appends / batches / loads / events); per-call times below\n")
    stats.sort_stats("tottime").print_stats(30)
    stats.sort_stats("cumulative").print_stats(30)
    print(stream.getvalue(), file=sys.stderr)


# ---------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="smaller workloads (under a minute)")
    parser.add_argument("--postgres-url", default=DEFAULT_POSTGRES_URL,
                        help=f"PostgreSQL server for the pg_ figures (default {DEFAULT_POSTGRES_URL})")
    parser.add_argument("--no-postgres", action="store_true", help="skip PostgreSQL")
    parser.add_argument("--profile", choices=("append", "append10", "load", "rebuild"),
                        help="profile OUR side of one workload on SQLite with cProfile and exit")
    parser.add_argument("--results-dir", type=Path, default=harness.RESULTS_DIR)
    args = parser.parse_args(argv)
    scale = QUICK if args.quick else FULL
    watch = harness.Stopwatch()

    with tempfile.TemporaryDirectory(prefix="bench-eventstore-") as tmp:
        root = Path(tmp)
        if args.profile:
            profile(args.profile, scale, root)
            return 0
        harness.log(f"eventstore benchmark ({'quick' if args.quick else 'full'}), temp dir {root}")
        sqlite_results = bench_backend(SQLiteBackend(root), scale, "sqlite")
        rebuild = bench_rebuild(root, scale)
        if args.no_postgres:
            pg_results: dict[str, Any] | None = None
            pg_status = "skipped: --no-postgres"
        else:
            problem = postgres_problem(args.postgres_url)
            if problem is None:
                pg_scale = Scale(
                    append_n=int(scale.append_n * PG_FACTOR), append10_batches=int(scale.append10_batches * PG_FACTOR),
                    load_count=scale.load_count, load_events=scale.load_events, rebuild_events=0, runs=scale.runs,
                    existing_streams=scale.existing_streams,
                )
                backend = PostgresBackend(args.postgres_url, root)
                try:
                    pg_results = bench_backend(backend, pg_scale, "pg")
                    pg_results["server"] = backend.server_settings()
                finally:
                    backend.close()
                pg_status = f"ok: {sa.engine.make_url(args.postgres_url).render_as_string(hide_password=True)}"
            else:
                pg_results, pg_status = None, f"unavailable: {problem}"

    headline: dict[str, Any] = {
        "append_ratio": round(sqlite_results["append"]["ratio"], 3),
        "append10_ratio": round(sqlite_results["append10"]["ratio"], 3),
        "load_ratio": round(sqlite_results["load"]["ratio"], 3),
        "rebuild_events_per_s": round(rebuild["events_per_s"]),
    }
    if pg_results is not None:
        headline |= {
            "pg_append_ratio": round(pg_results["append"]["ratio"], 3),
            "pg_append10_ratio": round(pg_results["append10"]["ratio"], 3),
            "pg_load_ratio": round(pg_results["load"]["ratio"], 3),
        }
    else:
        headline["postgres"] = pg_status
    goals = {
        "every_ratio_at_least_1": all(v >= 1.0 for k, v in headline.items() if k.endswith("_ratio")),
        "load_ratio_at_least_1.5": headline["load_ratio"] >= 1.5,
        "rebuild_events_per_s_at_least_50000": headline["rebuild_events_per_s"] >= 50_000,
    }
    results = {
        "benchmark": "eventstore",
        "mode": "quick" if args.quick else "full",
        "timestamp_utc": datetime.now(UTC).isoformat(),
        "headline": headline,
        "goals": goals,
        "sqlite": sqlite_results,
        "rebuild": rebuild,
        "postgres": pg_results if pg_results is not None else pg_status,
        "postgres_status": pg_status,
        "comparison": COMPARISON,
        "settings": {
            "scale": scale.__dict__,
            "pg_scale_factor": PG_FACTOR,
            "sqlite": {"journal_mode": SQLITE_JOURNAL_MODE, "synchronous": SQLITE_SYNCHRONOUS,
                       "how": "ours: Database's connect hook (Settings.sqlite_synchronous default); "
                              "theirs: a SQLiteConnectionPool subclass runs PRAGMA synchronous on each connection "
                              "(journal_mode=WAL is their default for file databases); both read back in "
                              "<backend>.settings", "sqlite_library": sqlite3.sqlite_version},
            "statistic": f"median of {scale.runs} interleaved runs per side, after a warm-up",
            "append_ratio_definition": "ours/theirs of the combined rate 2/(1/fresh + 1/existing) of the "
                                       "median fresh-stream and existing-stream rates (equal counts of each); "
                                       "both parts, with their per-run rates, under <backend>.append",
            "load_ratio_definition": "their ms per load / our ms per load",
        },
        "hardware": harness.hardware_metadata(PACKAGES),
        "wall_seconds": round(watch.elapsed, 1),
    }
    path = harness.save_results("eventstore", results, args.results_dir)

    rows: list[list[Any]] = []
    for prefix, data in (("", sqlite_results), ("pg_", pg_results)):
        if data is None:
            continue
        for key, label in (("append", "append (1 event)"), ("append10", "append10 (10 events)"), ("load", "load 1k events")):
            item = data[key]
            rows.append([f"{prefix}{label}", item["ours"], item["eventsourcing"], item["unit"], item["ratio"]])
            if key == "append":
                for part in ("fresh", "existing"):
                    sub = item[part]
                    rows.append([f"{prefix}  {part} stream", sub["ours"], sub["eventsourcing"], sub["unit"],
                                 sub["ratio"]])
    rows.append(["rebuild (sqlite)", rebuild["events_per_s"], None, "events/s", None])
    rows.append(["  of which in the GC", rebuild["gc_share_median"] * 100, None, "% of time", None])
    harness.print_table("Event store: ours vs eventsourcing (ratio > 1: ours better)",
                        ["workload", "ours", "eventsourcing", "unit", "ratio"], rows)
    harness.log(f"postgres: {pg_status}")
    harness.log(f"goals: {goals}")
    harness.log(f"saved {path} ({results['wall_seconds']} s)")
    print(json.dumps(headline | {"results_file": str(path.relative_to(harness.PROJECT_ROOT))
                                 if path.is_relative_to(harness.PROJECT_ROOT) else str(path)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
