"""Recipe runs executed against the real event store (SQLite and PostgreSQL): steps in order with
their outputs, a false `when` skipped with its reason, a failing step retried with back-off and then
failing the run with its reason, cancellation, and which runs a worker may take up."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import pairwise

import msgspec
import pytest
from factories import BASE_MODEL, register_layer

from genome_service.domain.academy import ACADEMY_SESSION, ChangeSessionStatus, SessionStatus
from genome_service.domain.recipe import Definition
from genome_service.domain.recipe_run import RunStatus
from genome_service.recipes.executor import Executor
from genome_service.recipes.service import RecipeRuns, Recipes
from genome_service.services.bootstrap import Services, build
from genome_service.services.context import Caller, Command, command_metadata

ALICE = Caller("alice")


def no_chat(*_args: object) -> object:
    raise AssertionError("no chat step here")


@pytest.fixture
def fast(services: Services) -> Iterator[Services]:
    """The services with a short retry back-off: 50 ms, then 100 ms."""
    settings = msgspec.structs.replace(services.settings, recipe_retry_backoff_seconds=0.05,
                                       inference_model=BASE_MODEL)
    yield build(settings, database=services.database, embedder=services.search.embedder)


def command(key: str | None = None) -> Command:
    return Command(ALICE, command_metadata("alice", "test", idempotency_key=key))


def define(services: Services, steps: list[dict], inputs: dict | None = None, name: str = "mine") -> str:
    spec = msgspec.convert({"steps": steps, "inputs": inputs or {}}, Definition)
    return Recipes(services).define(command(), name, spec).id


def event_types(services: Services, run_id: str) -> list[tuple[str, str | None]]:
    return [(e.type, getattr(e.event, "step_id", None)) for e in services.store.read_stream(run_id)]


PERSONA = {"id": "persona", "command": "persona.create", "params": {"name": "{{ inputs.name }}", "base_model": BASE_MODEL}}


def test_steps_run_in_order_a_false_when_is_skipped_with_its_reason_and_outputs_feed_later_steps(fast: Services) -> None:
    register_layer(fast, "l1")
    recipe = define(fast, [
        PERSONA,
        {"id": "attach", "command": "layers.attach", "when": "inputs.attach",
         "params": {"persona_id": "{{ steps.persona.output.persona_id }}", "layer_ids": ["l1"]}},
        {"id": "stack", "command": "genome.stack", "params": {"genome_id": "{{ steps.persona.output.genome_id }}"}},
    ], {"name": {"type": "string"}, "attach": {"type": "boolean", "default": False}})
    run_id = RecipeRuns(fast).start(command(), recipe, {"name": "Ada"}).id

    done = Executor(fast, no_chat).run(run_id)

    assert done.status is RunStatus.COMPLETED
    assert event_types(fast, run_id) == [
        ("RunStarted", None), ("RunPickedUp", None), ("StepStarted", "persona"), ("StepCompleted", "persona"),
        ("StepSkipped", "attach"), ("StepStarted", "stack"), ("StepCompleted", "stack"), ("RunCompleted", None)]
    view = RecipeRuns(fast).get(ALICE, run_id)
    assert [(s.id, s.status) for s in view.steps] == [("persona", "completed"), ("attach", "skipped"), ("stack", "completed")]
    assert view.steps[1].reason == "when 'inputs.attach' is false"
    persona = view.steps[0].output
    assert view.output == {"genome_id": persona["genome_id"], "persona_id": persona["persona_id"],
                           "base_model": BASE_MODEL, "layers": []}


def test_a_failing_step_is_retried_with_back_off_then_fails_the_run_with_its_reason(fast: Services) -> None:
    recipe = define(fast, [PERSONA, {"id": "attach", "command": "layers.attach", "retry": {"attempts": 3},
                                     "params": {"persona_id": "{{ steps.persona.output.persona_id }}", "layer_ids": ["nope"]}}],
                    {"name": {"type": "string"}})
    run_id = RecipeRuns(fast).start(command(), recipe, {"name": "Ada"}).id

    done = Executor(fast, no_chat).run(run_id)

    assert done.status is RunStatus.FAILED
    assert done.reason == "step 'attach' failed: layer_not_found: no layer 'nope'"
    history = fast.store.read_stream(run_id)
    attach = [e for e in history if e.type.startswith("Step") and e.event.step_id == "attach"]
    assert [e.type for e in attach] == ["StepStarted", "StepFailed", "StepRetried", "StepStarted", "StepFailed",
                                        "StepRetried", "StepStarted", "StepFailed"]
    assert [e.event.delay_seconds for e in attach if e.type == "StepRetried"] == [0.05, 0.1]
    # Each try starts only once its back-off has passed.
    waits = [(after.recorded_at - retried.recorded_at).total_seconds()
             for retried, after in pairwise(attach) if retried.type == "StepRetried"]
    assert waits[0] >= 0.05 - 0.005 and waits[1] >= 0.1 - 0.005
    assert history[-1].type == "RunFailed" and history[-1].event.step_id == "attach"
    # The step before ran once, whatever the retries: one persona.
    assert [e.type for e in fast.store.read_all()].count("PersonaCreated") == 1
    assert RecipeRuns(fast).get(ALICE, run_id).steps[1].attempts == 3


def test_a_step_taken_up_again_replays_its_appends_instead_of_making_twins(fast: Services) -> None:
    recipe = define(fast, [PERSONA], {"name": {"type": "string"}})
    run_id = RecipeRuns(fast).start(command(), recipe, {"name": "Ada"}).id
    executor = Executor(fast, no_chat)
    from genome_service.domain.recipe_run import RECIPE_RUN, PickUpRun, StartStep
    from genome_service.recipes.commands import COMMANDS, PersonaCreateInput

    # A first try that created the persona and died before recording it.
    fast.commands.execute(RECIPE_RUN, run_id, PickUpRun())
    fast.commands.execute(RECIPE_RUN, run_id, StartStep("persona"))
    state = executor._state(run_id)
    first = COMMANDS["persona.create"].run(executor._context(state, state.definition.steps[0]),
                                           PersonaCreateInput(name="Ada", base_model=BASE_MODEL))

    done = executor.run(run_id)

    assert done.status is RunStatus.COMPLETED and done.outputs["persona"] == msgspec.to_builtins(first)
    personas = [e for e in fast.store.read_all() if e.type == "PersonaCreated"]
    genomes = [e for e in fast.store.read_all() if e.type == "GenomeCreated"]
    assert (len(personas), len(genomes)) == (1, 1)


def test_a_cancelled_run_is_not_taken_up_and_a_run_waiting_on_a_live_session_is_left_alone(fast: Services) -> None:
    recipe = define(fast, [PERSONA], {"name": {"type": "string"}})
    runs = RecipeRuns(fast)
    first, second = (runs.start(command(), recipe, {"name": name}).id for name in ("Ada", "Grace"))
    cancelled = runs.cancel(command(), first)
    assert cancelled.status is RunStatus.CANCELLED and runs.waiting() == [second]
    assert Executor(fast, no_chat).run(first).status is RunStatus.CANCELLED

    from genome_service.domain.academy import StartAcademySession
    from genome_service.domain.recipe_run import RECIPE_RUN, AwaitStep, Awaited, PickUpRun, StartStep

    fast.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession("s1", "alice", "p1", "goal"))
    recipe = define(fast, [{"id": "train", "command": "academy.train", "async": True,
                            "params": {"persona_id": "p1", "goal": "goal"}}], name="waits")
    third = runs.start(command(), recipe, {}).id
    for step in (PickUpRun(), StartStep("train"), AwaitStep("train", Awaited("academy_session", "s1"))):
        fast.commands.execute(RECIPE_RUN, third, step)
    assert runs.waiting() == [second]
    fast.commands.execute(ACADEMY_SESSION, "s1", ChangeSessionStatus(SessionStatus.CANCELLED))
    assert runs.waiting() == [second, third]
    done = Executor(fast, no_chat).run(third)
    assert done.status is RunStatus.FAILED and "academy session s1 cancelled" in done.reason


def test_a_chat_step_whose_turn_was_recorded_before_a_crash_answers_with_it_and_chats_no_more(fast: Services) -> None:
    from genome_service.domain.conversation import (
        CONVERSATION,
        Generation,
        Message,
        RecordTurn,
        SamplingUsed,
        Usage,
    )
    from genome_service.domain.recipe_run import RECIPE_RUN, PickUpRun, StartStep

    recipe = define(fast, [PERSONA, {"id": "ask", "command": "persona.chat", "params": {
        "persona_id": "{{ steps.persona.output.persona_id }}", "message": "Hello?"}}], {"name": {"type": "string"}})
    run_id = RecipeRuns(fast).start(command(), recipe, {"name": "Ada"}).id
    executor = Executor(fast, no_chat)
    fast.commands.execute(RECIPE_RUN, run_id, PickUpRun())
    state = executor._step(executor._state(run_id), executor._state(run_id).definition.steps[0])
    persona_id = state.outputs["persona"]["persona_id"]
    # The first try of the chat step: its turn recorded under the step's key, then the worker died.
    fast.commands.execute(RECIPE_RUN, run_id, StartStep("ask"))
    generation = Generation("m", None, SamplingUsed(0.0, 1.0, 8), Usage(5, 3), "stop")
    key = executor._context(state, state.definition.steps[1]).command.metadata
    fast.commands.execute(CONVERSATION, "c1", RecordTurn("c1", persona_id, "alice", (Message("user", "Hello?"),),
                                                         Message("assistant", "Hi.", generation)), metadata=key)

    done = executor.run(run_id)

    assert done.status is RunStatus.COMPLETED
    assert done.outputs["ask"] == {"conversation_id": "c1", "content": "Hi.", "completion_tokens": 3}


def test_cancel_stops_a_run_within_its_step_and_cancels_the_session_a_run_waits_on(services: Services) -> None:
    import threading
    import time

    from genome_service.domain.academy import StartAcademySession
    from genome_service.domain.recipe_run import RECIPE_RUN, AwaitStep, Awaited, PickUpRun, StartStep

    slow = build(msgspec.structs.replace(services.settings, recipe_retry_backoff_seconds=30.0,
                                         inference_model=BASE_MODEL), database=services.database,
                 embedder=services.search.embedder)
    recipe = define(slow, [PERSONA, {"id": "attach", "command": "layers.attach", "retry": {"attempts": 3},
                                     "params": {"persona_id": "{{ steps.persona.output.persona_id }}", "layer_ids": ["nope"]}}],
                    {"name": {"type": "string"}})
    runs = RecipeRuns(slow)
    run_id = runs.start(command(), recipe, {"name": "Ada"}).id
    ended: list = []
    worker = threading.Thread(target=lambda: ended.append(Executor(slow, no_chat).run(run_id)))
    worker.start()
    deadline = time.monotonic() + 30
    while "StepRetried" not in [e.type for e in slow.store.read_stream(run_id)]:  # now waiting 30 s to try again
        assert worker.is_alive() and time.monotonic() < deadline
        time.sleep(0.02)
    cancelled_at = time.monotonic()
    runs.cancel(command(), run_id)
    worker.join(timeout=10)

    assert not worker.is_alive() and time.monotonic() - cancelled_at < 5
    assert ended[0].status is RunStatus.CANCELLED and ended[0].reason == "cancelled by alice"
    assert [e.type for e in slow.store.read_stream(run_id)][-2:] == ["StepRetried", "RunCancelled"]

    # A run waiting on a session: cancelling it cancels the session too.
    slow.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession("s1", "alice", "p1", "goal"))
    waits = define(slow, [{"id": "train", "command": "academy.train", "async": True,
                           "params": {"persona_id": "p1", "goal": "goal"}}], name="waits")
    waiting = runs.start(command(), waits, {}).id
    for step in (PickUpRun(), StartStep("train"), AwaitStep("train", Awaited("academy_session", "s1"))):
        slow.commands.execute(RECIPE_RUN, waiting, step)
    assert runs.cancel(command(), waiting).status is RunStatus.CANCELLED
    assert slow.repository.load(ACADEMY_SESSION, "s1").state.status is SessionStatus.CANCELLED
