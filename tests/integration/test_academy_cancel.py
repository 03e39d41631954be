"""Cancelling is the aggregate's rule, decided on the stream's version: two cancels that both
read a running session cannot both be recorded, whichever database serialises them."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from genome_service.domain.academy import ACADEMY_SESSION, SessionStatus, SessionStatusChanged, StartAcademySession
from genome_service.domain.common import DomainError
from genome_service.eventstore.database import Database
from genome_service.eventstore.records import EventMetadata
from genome_service.services.academy_sessions import AcademySessions
from genome_service.services.bootstrap import Services, build
from genome_service.services.context import Caller, Command

ALICE = Command(Caller("alice"), EventMetadata(actor="alice"))


def load_then_wait(services: Services, barrier: threading.Barrier) -> None:
    """The first load of each canceller waits for the other's: both decide on the same version."""
    load, waited = services.repository.load, threading.local()

    def load_at_the_barrier(*args: Any, **kwargs: Any) -> Any:
        loaded = load(*args, **kwargs)
        if not getattr(waited, "done", False):
            waited.done = True
            barrier.wait(timeout=30)
        return loaded

    services.repository.load = load_at_the_barrier  # type: ignore[method-assign]


def test_two_cancels_decided_on_the_same_version_record_one_and_refuse_the_other(services: Services) -> None:
    services.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession("s1", "alice", "p1", "Sound calm."))
    # Two processes' worth of connections: each canceller writes through its own.
    others = [Database(services.database.url) for _ in range(2)]
    cancellers = [build(services.settings, database=database) for database in others]
    barrier = threading.Barrier(2)
    for canceller in cancellers:
        load_then_wait(canceller, barrier)

    def cancel(canceller: Services) -> str:
        try:
            return AcademySessions(canceller).cancel(ALICE, "s1").status
        except DomainError as error:
            return error.rule

    try:
        with ThreadPoolExecutor(2) as pool:
            outcomes = sorted(pool.map(cancel, cancellers))
    finally:
        for database in others:
            database.dispose()
    assert outcomes == ["cancelled", "session_finished"]
    changes = [e.event for e in services.store.read_stream("s1") if isinstance(e.event, SessionStatusChanged)]
    assert changes == [SessionStatusChanged(SessionStatus.CANCELLED, "cancelled by alice")]


@pytest.mark.parametrize("ended", [SessionStatus.CANCELLED, SessionStatus.FAILED])
def test_a_cancel_after_the_end_is_refused_and_appends_nothing(services: Services, ended: SessionStatus) -> None:
    from genome_service.domain.academy import ChangeSessionStatus

    services.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession("s1", "alice", "p1", "Sound calm."))
    services.commands.execute(ACADEMY_SESSION, "s1", ChangeSessionStatus(ended, "over"))
    version = services.store.stream_version("s1")
    with pytest.raises(DomainError) as refused:
        AcademySessions(services).cancel(ALICE, "s1")
    assert refused.value.rule == "session_finished" and services.store.stream_version("s1") == version
