"""Worker claims: one holder per session at a time, on SQLite (file lock) and PostgreSQL (advisory lock)."""

from __future__ import annotations

from genome_service.academy.worker import Worker
from genome_service.domain.academy import ACADEMY_SESSION, ChangeSessionStatus, SessionStatus, StartAcademySession
from genome_service.eventstore.database import Database
from genome_service.services.bootstrap import Services, build


def never_runs():  # type: ignore[no-untyped-def]
    raise AssertionError("no session should be run here")


def test_a_claimed_session_cannot_be_claimed_again_until_released(services: Services) -> None:
    # A second Database: its own connections, as a second worker process would have.
    other_database = Database(services.database.url)
    other = build(services.settings, database=other_database)
    first, second = Worker(services, never_runs), Worker(other, never_runs)
    try:
        with first.claim("s1") as held:
            assert held
            with second.claim("s1") as taken, second.claim("s2") as free:
                assert (taken, free) == (False, True)
        with second.claim("s1") as held_after:
            assert held_after
    finally:
        other_database.dispose()


def test_only_pending_and_running_sessions_are_candidates_oldest_first(services: Services) -> None:
    for session_id in ("s1", "s2", "s3"):
        services.commands.execute(ACADEMY_SESSION, session_id, StartAcademySession(session_id, "alice", "p1", "goal"))
    services.commands.execute(ACADEMY_SESSION, "s2", ChangeSessionStatus(SessionStatus.CANCELLED))
    services.commands.execute(ACADEMY_SESSION, "s3", ChangeSessionStatus(SessionStatus.RUNNING))
    assert Worker(services, never_runs).candidates() == ["s1", "s3"]
