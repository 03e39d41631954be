import math

import msgspec
import pytest

from genome_service.domain.academy import (
    ACADEMY_SESSION,
    AcademyEvent,
    AcademySessionStarted,
    ChangeSessionStatus,
    SessionStatus,
    SessionStatusChanged,
    StartAcademySession,
)
from genome_service.domain.common import DomainError

PENDING, RUNNING, COMPLETED, FAILED, CANCELLED = SessionStatus


def run(state, *commands):
    for command in commands:
        state = ACADEMY_SESSION.fold(state, ACADEMY_SESSION.decide(command, state))
    return state


def refused(command, state):
    with pytest.raises(DomainError) as caught:
        ACADEMY_SESSION.decide(command, state)
    return caught.value.rule


def start(**overrides):
    fields = {"session_id": "s1", "owner": "alice", "persona_id": "p1", "goal": "sound stoic"}
    return StartAcademySession(**{**fields, **overrides})


@pytest.fixture
def session():
    return run(None, start())


def at(status):
    paths = {
        PENDING: (),
        RUNNING: (RUNNING,),
        COMPLETED: (RUNNING, COMPLETED),
        FAILED: (FAILED,),
        CANCELLED: (CANCELLED,),
    }
    return run(run(None, start()), *(ChangeSessionStatus(s) for s in paths[status]))


def test_starting_a_session_folds_into_a_pending_session_with_default_budget(session):
    assert session.session_id == "s1"
    assert session.owner == "alice"
    assert session.persona_id == "p1"
    assert session.goal == "sound stoic"
    assert session.target_similarity == 0.95
    assert session.budget_steps == 100
    assert session.budget_seconds == 3600.0
    assert session.status is PENDING
    assert session.reason == ""


def test_starting_a_session_twice_is_refused(session):
    assert refused(start(), session) == "academy_session_exists"


def test_changing_a_missing_session_is_refused():
    assert refused(ChangeSessionStatus(RUNNING), None) == "academy_session_not_found"


@pytest.mark.parametrize(
    ("overrides", "rule"),
    [
        ({"goal": " "}, "goal_required"),
        ({"goal": "x" * 2001}, "goal_too_long"),
        ({"target_similarity": 0.0}, "target_similarity_out_of_range"),
        ({"target_similarity": 1.01}, "target_similarity_out_of_range"),
        ({"target_similarity": math.nan}, "target_similarity_out_of_range"),
        ({"budget_steps": 0}, "budget_steps_out_of_range"),
        ({"budget_steps": 100_001}, "budget_steps_out_of_range"),
        ({"budget_seconds": 0.0}, "budget_seconds_out_of_range"),
        ({"budget_seconds": 86_400.5}, "budget_seconds_out_of_range"),
        ({"budget_seconds": math.inf}, "budget_seconds_out_of_range"),
    ],
)
def test_starting_with_an_invalid_plan_is_refused(overrides, rule):
    assert refused(start(**overrides), None) == rule


def test_the_plan_bounds_are_inclusive():
    state = run(None, start(target_similarity=1.0, budget_steps=100_000, budget_seconds=86_400.0))
    assert (state.target_similarity, state.budget_steps, state.budget_seconds) == (1.0, 100_000, 86_400.0)
    assert run(None, start(budget_steps=1)).budget_steps == 1


@pytest.mark.parametrize(
    ("start_at", "to"),
    [
        (PENDING, RUNNING),
        (PENDING, CANCELLED),
        (PENDING, FAILED),
        (RUNNING, COMPLETED),
        (RUNNING, FAILED),
        (RUNNING, CANCELLED),
        (RUNNING, PENDING),
    ],
)
def test_an_allowed_transition_changes_the_status_and_records_the_reason(start_at, to):
    state = run(at(start_at), ChangeSessionStatus(to, "because"))
    assert state.status is to
    assert state.reason == "because"


def test_going_from_pending_straight_to_completed_is_refused(session):
    assert refused(ChangeSessionStatus(COMPLETED), session) == "status_transition_not_allowed"


@pytest.mark.parametrize(
    ("finished", "to"),
    [(finished, to) for finished in (COMPLETED, FAILED, CANCELLED) for to in SessionStatus if to is not finished],
)
def test_a_finished_session_refuses_any_change(finished, to):
    with pytest.raises(DomainError) as caught:
        ACADEMY_SESSION.decide(ChangeSessionStatus(to), at(finished))
    assert caught.value.rule == "session_finished"
    assert finished.value in caught.value.message


@pytest.mark.parametrize("status", list(SessionStatus))
def test_changing_to_the_current_status_is_a_no_op(status):
    assert ACADEMY_SESSION.decide(ChangeSessionStatus(status), at(status)) == []


def test_an_unknown_command_is_refused(session):
    assert refused(object(), session) == "unknown_command"


@pytest.mark.parametrize(
    "event",
    [
        AcademySessionStarted("s1", "alice", "p1", "goal", 0.9, 50, 60.0),
        SessionStatusChanged(RUNNING),
        SessionStatusChanged(FAILED, "out of memory"),
    ],
)
def test_every_academy_event_survives_a_json_round_trip(event):
    assert msgspec.json.decode(msgspec.json.encode(event), type=AcademyEvent) == event
