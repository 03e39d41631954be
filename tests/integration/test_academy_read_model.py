"""An academy session's progress through the command handler: the read model follows and rebuilds the same."""

from __future__ import annotations

import sqlalchemy as sa

from genome_service.domain.academy import (
    ACADEMY_SESSION,
    ChangeSessionStatus,
    Difficulty,
    ExampleMessage,
    KeepExample,
    MakePlan,
    PlanTask,
    RecordChallenge,
    RecordLayerProduced,
    RecordTrainingProgress,
    ScoreResponse,
    SessionStatus,
    StartAcademySession,
    TaskAction,
)
from genome_service.domain.layer import TraitType, TrainingMetrics
from genome_service.projections.tables import ACADEMY_SESSIONS
from genome_service.services.bootstrap import Services

TABLE = ACADEMY_SESSIONS


def session_row(services: Services) -> dict:
    with services.database.read() as connection:
        return dict(connection.execute(sa.select(TABLE)).mappings().one())


def test_session_progress_shows_in_the_read_model_and_a_rebuild_gives_the_same_row(services: Services) -> None:
    run = services.commands.execute
    run(ACADEMY_SESSION, "s1", StartAcademySession("s1", "alice", "p1", "sound calm"))
    assert (session_row(services)["planned"], session_row(services)["layer_ids"]) == (False, [])
    run(ACADEMY_SESSION, "s1", ChangeSessionStatus(SessionStatus.RUNNING))
    run(ACADEMY_SESSION, "s1", MakePlan((PlanTask("t1", TraitType.TONE_AND_VOICE, TaskAction.TRAIN),)))
    for number in range(3):
        cid = f"c{number}"
        run(ACADEMY_SESSION, "s1", RecordChallenge(cid, TraitType.TONE_AND_VOICE, Difficulty.BEGINNER, "Greet me."))
        run(ACADEMY_SESSION, "s1", ScoreResponse(cid, "Hello.", 70.0 + number, "calm", "model"))
    messages = (ExampleMessage("user", "Greet me."), ExampleMessage("assistant", "Hello."))
    run(ACADEMY_SESSION, "s1", KeepExample("c0", messages))
    run(ACADEMY_SESSION, "s1", RecordTrainingProgress("t1", 4, 2.0, 1e-3))
    run(ACADEMY_SESSION, "s1", RecordTrainingProgress("t1", 8, 1.25, 1e-4))
    metrics = TrainingMetrics(loss=1.25, steps=8)
    run(ACADEMY_SESSION, "s1", RecordLayerProduced("t1", "l1", 0.75, "b" * 64, metrics))
    run(ACADEMY_SESSION, "s1", ChangeSessionStatus(SessionStatus.COMPLETED))

    live = session_row(services)
    assert (live["status"], live["planned"], live["challenge_count"], live["example_count"]) == ("completed", True, 3, 1)
    assert (live["step"], live["loss"], live["layer_ids"], live["version"]) == (8, 1.25, ["l1"], 14)
    services.projector.rebuild()
    assert session_row(services) == live
