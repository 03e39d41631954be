import math

import msgspec
import pytest

from genome_service.domain.academy import (
    ACADEMY_SESSION,
    AcademyEvent,
    AcademySessionStarted,
    ChallengeGenerated,
    ChangeSessionStatus,
    Difficulty,
    ExampleKept,
    ExampleMessage,
    KeepExample,
    LayerProduced,
    LayerReused,
    MakePlan,
    PlanMade,
    PlanTask,
    RecordChallenge,
    RecordLayerProduced,
    RecordLayerReused,
    RecordTrainingProgress,
    ResponseScored,
    ScoreResponse,
    SessionStatus,
    SessionStatusChanged,
    StartAcademySession,
    TaskAction,
    TrainingProgressed,
    goal_needs,
)
from genome_service.domain.common import DomainError
from genome_service.domain.layer import TraitType, TrainingMetrics

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
    [(finished, to) for finished in (COMPLETED, FAILED, CANCELLED) for to in SessionStatus],
)
def test_a_finished_session_refuses_any_change_its_own_status_included(finished, to):
    with pytest.raises(DomainError) as caught:
        ACADEMY_SESSION.decide(ChangeSessionStatus(to), at(finished))
    assert caught.value.rule == "session_finished"
    assert finished.value in caught.value.message


@pytest.mark.parametrize("status", [PENDING, RUNNING])
def test_changing_a_live_session_to_its_current_status_is_a_no_op(status):
    assert ACADEMY_SESSION.decide(ChangeSessionStatus(status), at(status)) == []


def test_an_unknown_command_is_refused(session):
    assert refused(object(), session) == "unknown_command"


TONE = TraitType.TONE_AND_VOICE
TRAIN = PlanTask("t1", TONE, TaskAction.TRAIN)
USE = PlanTask("t2", TraitType.DOMAIN_EXPERTISE, TaskAction.USE, "l9", 0.97)
EXAMPLE = (ExampleMessage("system", "Be calm."), ExampleMessage("user", "Hi?"), ExampleMessage("assistant", "Hello."))
METRICS = TrainingMetrics(loss=0.5, steps=10)


def planned():
    return run(at(RUNNING), MakePlan((TRAIN, USE)))


def scored():
    challenge = RecordChallenge("c1", TONE, Difficulty.ADVANCED, "Say hi calmly.", ("calm",), "t1")
    return run(planned(), challenge, ScoreResponse("c1", "Hello.", 80.0, "calm enough", "model"))


def test_a_session_records_plan_challenges_examples_training_and_layers_in_order():
    state = run(
        scored(),
        KeepExample("c1", EXAMPLE),
        RecordTrainingProgress("t1", 5, 2.5, 1e-3),
        RecordTrainingProgress("t1", 10, 1.5, 5e-4),
        RecordLayerProduced("t1", "l10", 0.8, "a" * 64, METRICS),
        RecordLayerReused("t2", "l9", 1.0),
    )
    assert state.tasks == (TRAIN, USE)
    assert state.challenge("c1").score == 80.0 and state.challenge("c1").kept
    assert (state.examples, state.last_step("t1"), state.loss) == (1, 10, 1.5)
    assert state.finished_tasks == (("t1", "l10"), ("t2", "l9"))


def test_a_kept_example_is_tagged_with_the_curriculum_level_of_its_challenge():
    assert ACADEMY_SESSION.decide(KeepExample("c1", EXAMPLE), scored()) == [ExampleKept("c1", EXAMPLE, 3)]


@pytest.mark.parametrize(
    ("state", "command", "rule"),
    [
        (planned, MakePlan((TRAIN,)), "plan_exists"),
        (lambda: at(RUNNING), MakePlan(()), "plan_size_out_of_range"),
        (lambda: at(RUNNING), MakePlan((TRAIN, TRAIN)), "task_id_repeated"),
        (lambda: at(RUNNING), MakePlan((PlanTask("t1", TONE, TaskAction.REFINE),)), "task_layer_mismatch"),
        (lambda: at(COMPLETED), MakePlan((TRAIN,)), "session_finished"),
        (scored, RecordChallenge("c1", TONE, Difficulty.BEGINNER, "again"), "challenge_exists"),
        (planned, RecordChallenge("c2", TONE, Difficulty.BEGINNER, " "), "prompt_required"),
        (planned, RecordChallenge("c2", TONE, Difficulty.BEGINNER, "p", task_id="t7"), "task_not_found"),
        (planned, ScoreResponse("c9", "r", 50.0, "why", "model"), "challenge_not_found"),
        (scored, ScoreResponse("c1", "r", 50.0, "why", "model"), "response_exists"),
        (planned, KeepExample("c1", EXAMPLE), "challenge_not_scored"),
        (scored, KeepExample("c1", EXAMPLE[:2]), "example_malformed"),
        (scored, KeepExample("c1", (ExampleMessage("tool", "x"), EXAMPLE[2])), "example_malformed"),
        (planned, RecordTrainingProgress("t2", 1, 1.0, 1e-3), "task_not_training"),
        (planned, RecordTrainingProgress("t1", 0, 1.0, 1e-3), "training_step_not_after_last"),
        (planned, RecordTrainingProgress("t1", 1, math.nan, 1e-3), "training_progress_not_finite"),
        (planned, RecordLayerProduced("t1", "l1", 1.5, "a" * 64, METRICS), "weight_out_of_range"),
        (planned, RecordLayerReused("t2", "l8", 1.0), "task_not_reuse"),
        (planned, RecordLayerReused("t1", "l9", 1.0), "task_not_reuse"),
    ],
)
def test_a_session_command_that_breaks_a_rule_is_refused(state, command, rule):
    assert refused(command, state()) == rule


@pytest.mark.parametrize("score", [-0.5, 100.5, math.nan, math.inf])
def test_a_score_outside_0_to_100_is_refused(score):
    challenge = RecordChallenge("c1", TONE, Difficulty.BEGINNER, "Say hi.")
    assert refused(ScoreResponse("c1", "Hi.", score, "why", "heuristic"), run(planned(), challenge)) == (
        "score_out_of_range"
    )


def test_a_training_step_recorded_twice_is_refused_so_no_step_runs_twice():
    state = run(planned(), RecordTrainingProgress("t1", 5, 2.0, 1e-3))
    assert refused(RecordTrainingProgress("t1", 5, 2.0, 1e-3), state) == "training_step_not_after_last"
    assert refused(RecordTrainingProgress("t1", 3, 2.0, 1e-3), state) == "training_step_not_after_last"


def test_training_seconds_add_up_across_tasks_and_never_go_back():
    state = run(planned(), RecordTrainingProgress("t1", 5, 2.0, 1e-3, seconds=4.0))
    assert state.training_seconds == 4.0
    assert refused(RecordTrainingProgress("t1", 10, 2.0, 1e-3, seconds=3.5), state) == "training_seconds_not_after_last"
    assert refused(RecordTrainingProgress("t1", 10, 2.0, 1e-3, seconds=math.inf), state) == (
        "training_seconds_not_after_last"
    )
    assert run(state, RecordTrainingProgress("t1", 10, 2.0, 1e-3, seconds=9.0)).training_seconds == 9.0


@pytest.mark.parametrize(
    ("goal", "limit", "needs"),
    [
        ("Sound calm, and kind.", 3, ["Sound calm, and kind."]),
        ("Sound calm.  Explain maths!\nBe brief; be kind.", 3, ["Sound calm.", "Explain maths!", "Be brief; be kind."]),
        ("Sound calm. Explain maths. Be brief. Be kind.", 3, ["Sound calm.", "Explain maths.", "Be brief. Be kind."]),
        ("Sound calm. sound calm. Be brief.", 3, ["Sound calm.", "Be brief."]),
        ("Sound calm. Be brief.", 1, ["Sound calm. Be brief."]),
    ],
)
def test_a_goal_splits_into_a_few_distinct_needs_and_loses_no_part(goal, limit, needs):
    assert goal_needs(goal, limit) == needs


def test_trained_tokens_add_up_over_the_layers_produced_and_are_unknown_once_a_layer_did_not_say():
    two = MakePlan((TRAIN, PlanTask("t3", TraitType.DOMAIN_EXPERTISE, TaskAction.TRAIN)))
    counted = run(at(RUNNING), two, RecordLayerProduced("t1", "l10", 1.0, "a" * 64, TrainingMetrics(loss=0.5, steps=10, tokens=120)))
    assert counted.trained_tokens == 120
    later = RecordLayerProduced("t3", "l11", 1.0, "b" * 64, TrainingMetrics(loss=0.4, steps=5, tokens=30))
    assert run(counted, later).trained_tokens == 150
    # A layer produced before layers counted their tokens: the sum is unknown, not 120.
    assert run(counted, RecordLayerProduced("t3", "l11", 1.0, "b" * 64, METRICS)).trained_tokens is None


def test_a_task_gets_one_layer_at_most():
    state = run(planned(), RecordLayerProduced("t1", "l10", 1.0, "a" * 64, METRICS))
    assert refused(RecordLayerProduced("t1", "l11", 1.0, "a" * 64, METRICS), state) == "task_finished"


@pytest.mark.parametrize(
    "event",
    [
        AcademySessionStarted("s1", "alice", "p1", "goal", 0.9, 50, 60.0),
        SessionStatusChanged(RUNNING),
        SessionStatusChanged(FAILED, "out of memory"),
        PlanMade((TRAIN, USE)),
        ChallengeGenerated("c1", TONE, Difficulty.BEGINNER, "Say hi.", ("calm",), "t1"),
        ResponseScored("c1", "Hello.", 42.5, "fine", "heuristic"),
        ExampleKept("c1", EXAMPLE, 1),
        TrainingProgressed("t1", 5, 1.25, 1e-4),
        LayerProduced("t1", "l10", 0.8, "a" * 64, METRICS, "l9"),
        LayerReused("t2", "l9", 1.0),
    ],
)
def test_every_academy_event_survives_a_json_round_trip(event):
    assert msgspec.json.decode(msgspec.json.encode(event), type=AcademyEvent) == event
