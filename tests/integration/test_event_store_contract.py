"""The event store's contract, run once on SQLite and once on PostgreSQL."""

from __future__ import annotations

import threading
from collections import Counter

import msgspec
import pytest

from genome_service.domain.persona import PersonaProfileChanged
from genome_service.eventstore.codec import EventCodec, Upcaster
from genome_service.eventstore.database import Database
from genome_service.eventstore.errors import (
    ConcurrencyConflict,
    IdempotencyKeyReused,
    StreamTypeMismatch,
)
from genome_service.eventstore.records import EventMetadata, Expect
from genome_service.eventstore.store import EventStore
from genome_service.eventstore.subscription import CatchUpSubscription
from genome_service.services.bootstrap import domain_codec


@pytest.fixture
def store(database: Database) -> EventStore:
    return EventStore(database, domain_codec())


def _note(text: str) -> PersonaProfileChanged:
    return PersonaProfileChanged(description=text)


def test_sixteen_racing_writers_leave_one_gapless_history_and_name_each_conflict(store: EventStore) -> None:
    threads, attempts = 16, 200
    successes = Counter[int]()
    conflicts: list[ConcurrencyConflict] = []
    lock = threading.Lock()

    def writer(thread: int) -> None:
        for attempt in range(attempts):
            expected = store.stream_version("s1")
            try:
                store.append("s1", "persona", [_note(f"{thread}:{attempt}")], expected or Expect.NO_STREAM)
            except ConcurrencyConflict as conflict:
                with lock:
                    conflicts.append(conflict)
                assert conflict.expected in (expected, Expect.NO_STREAM)
                assert conflict.actual > expected
                assert f"expected version {conflict.expected}" in str(conflict)
                assert f"at version {conflict.actual}" in str(conflict)
            else:
                with lock:
                    successes[thread] += 1

    workers = [threading.Thread(target=writer, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()

    history = store.read_stream("s1")
    assert sum(successes.values()) == len(history) == store.stream_version("s1")
    assert sum(successes.values()) + len(conflicts) == threads * attempts
    assert [e.version for e in history] == list(range(1, len(history) + 1))
    assert len({e.event.description for e in history}) == len(history)
    positions = [e.position for e in history]
    assert positions == sorted(positions) and len(set(positions)) == len(positions)


def test_a_catch_up_reader_sees_every_event_exactly_once_in_position_order_while_writers_append(store: EventStore) -> None:
    writers, streams_per_writer, appends_per_stream = 4, 10, 15
    total = writers * streams_per_writer * appends_per_stream
    seen: list = []
    subscription = CatchUpSubscription(store, batch_size=37, poll_interval=0.005)

    def read() -> None:
        for event in subscription:
            seen.append(event)
            if len(seen) == total:
                subscription.stop.set()

    def write(writer: int) -> None:
        for i in range(appends_per_stream):
            for s in range(streams_per_writer):
                store.append(f"w{writer}-s{s}", "persona", [_note(f"{writer}/{s}/{i}")], Expect.ANY)

    reader = threading.Thread(target=read)
    reader.start()
    pool = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    reader.join(timeout=60)
    subscription.stop.set()

    assert not reader.is_alive(), f"reader stalled after {len(seen)} of {total} events"
    assert [e.position for e in seen] == list(range(1, total + 1))
    assert len({(e.stream_id, e.version) for e in seen}) == total


def test_a_multi_event_append_is_atomic_with_the_callers_transaction(store: EventStore) -> None:
    with pytest.raises(RuntimeError), store.database.write() as connection:
        store.append_in(connection, "s1", "persona", [_note("a"), _note("b"), _note("c")], Expect.NO_STREAM)
        raise RuntimeError("the caller fails after appending")
    assert store.read_stream("s1") == []
    result = store.append("s1", "persona", [_note("a"), _note("b"), _note("c")], Expect.NO_STREAM)
    assert [e.version for e in result.events] == [1, 2, 3]
    assert [e.position for e in result.events] == [1, 2, 3]


def test_expected_versions_any_no_stream_and_exact(store: EventStore) -> None:
    store.append("s1", "persona", [_note("a")], Expect.NO_STREAM)
    with pytest.raises(ConcurrencyConflict, match="expected version no stream, but it is at version 1"):
        store.append("s1", "persona", [_note("b")], Expect.NO_STREAM)
    with pytest.raises(ConcurrencyConflict, match="expected version 2, but it is at version 1"):
        store.append("s1", "persona", [_note("b")], 2)
    store.append("s1", "persona", [_note("b")], 1)
    store.append("s1", "persona", [_note("c")], Expect.ANY)
    with pytest.raises(StreamTypeMismatch):
        store.append("s1", "genome", [_note("d")], Expect.ANY)
    assert [e.event.description for e in store.read_stream("s1")] == ["a", "b", "c"]


def test_an_idempotency_key_makes_a_retried_append_a_no_op(store: EventStore) -> None:
    meta = EventMetadata(actor="alice", idempotency_key="req-1")
    first = store.append("s1", "persona", [_note("a"), _note("b")], Expect.NO_STREAM, meta)
    retry = store.append("s1", "persona", [_note("a"), _note("b")], Expect.NO_STREAM, meta)
    assert retry.replayed and not first.replayed
    assert [e.position for e in retry.events] == [e.position for e in first.events]
    assert store.last_position() == 2
    with pytest.raises(IdempotencyKeyReused):
        store.append("s2", "persona", [_note("x")], Expect.NO_STREAM, meta)
    assert store.read_stream("s1")[0].metadata.actor == "alice"


def test_reads_by_version_range_and_from_a_global_position(store: EventStore) -> None:
    for i in range(5):
        store.append("a", "persona", [_note(f"a{i}")], Expect.ANY)
        store.append("b", "persona", [_note(f"b{i}")], Expect.ANY)
    assert [e.version for e in store.read_stream("a", after_version=2, to_version=4)] == [3, 4]
    tail = store.read_all(after_position=7, limit=10)
    assert [e.position for e in tail] == [8, 9, 10]
    assert [len(b) for b in store.iter_all(batch_size=4)] == [4, 4, 2]


class NoteV1(msgspec.Struct, frozen=True, tag="NoteTaken"):
    text: str


class NoteV3(msgspec.Struct, frozen=True, tag="NoteTaken"):
    body: str
    language: str


def test_old_schema_events_are_upcast_on_read(database: Database) -> None:
    old = EventStore(database, EventCodec([NoteV1]))
    old.append("n1", "note", [NoteV1("hello")], Expect.NO_STREAM)

    def rename_text_to_body(raw: dict) -> dict:
        return {"body": raw.pop("text"), **raw}

    def add_language(raw: dict) -> dict:
        return {**raw, "language": "en"}

    new = EventStore(database, EventCodec([NoteV3], [Upcaster("NoteTaken", 2, add_language), Upcaster("NoteTaken", 1, rename_text_to_body)]))
    new.append("n1", "note", [NoteV3("bonjour", "fr")], 1)
    events = new.read_stream("n1")
    assert [e.schema_version for e in events] == [1, 3]
    assert [e.event for e in events] == [NoteV3("hello", "en"), NoteV3("bonjour", "fr")]
