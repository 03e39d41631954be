"""Recipe runs on academy worker processes, SIGKILLed twice: once in a synchronous step (a long
chat, killed once its step has started) and once in the asynchronous Academy step (after the
session's first progress event). The next worker finishes the run, and no completed step runs
again: counted from the run's events and from what the steps made (one persona, one genome, one
session). On SQLite and on PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import msgspec
import pytest
from servers import CLI, clean_env
from test_academy_worker import ACADEMY, MODEL

from genome_service.domain.academy import TrainingProgressed
from genome_service.domain.recipe import Definition
from genome_service.domain.recipe_run import RunStatus, StepAwaiting, StepCompleted, StepStarted
from genome_service.eventstore.migrations import upgrade
from genome_service.recipes.service import RecipeRuns, Recipes
from genome_service.services.bootstrap import Services, build
from genome_service.services.context import Caller, Command, command_metadata
from genome_service.services.personas import Personas
from genome_service.settings import Settings
from rag.embedder import SentenceTransformerEmbedder

ALICE = Caller("alice")
RECIPE = {
    "inputs": {"name": {"type": "string"}},
    "steps": [
        {"id": "persona", "command": "persona.create", "params": {"name": "{{ inputs.name }}", "base_model": MODEL}},
        {"id": "chat", "command": "persona.chat", "params": {
            "persona_id": "{{ steps.persona.output.persona_id }}", "message": "Tell me a long story.", "max_tokens": 1000}},
        {"id": "train", "command": "academy.train", "async": True, "params": {
            "persona_id": "{{ steps.persona.output.persona_id }}", "goal": "Sound calm.", "budget_steps": 10}},
        {"id": "stack", "command": "genome.stack", "params": {"persona_id": "{{ steps.persona.output.persona_id }}"}},
    ],
}


def worker_env(tmp_path: Path, tiny_model: Path, database_url: str | None = None) -> dict[str, str]:
    """Worker settings on the tiny model, and a migrated database: SQLite in the data dir unless a URL is given."""
    (tmp_path / "data").mkdir()
    extra = {**ACADEMY, "GENOME_CHAT_MAX_TOKENS_LIMIT": "1000"}
    if database_url is None:
        upgrade(f"sqlite:///{tmp_path / 'data' / 'genome.db'}")
    else:
        extra["GENOME_DATABASE_URL"] = database_url
    environment = clean_env(tmp_path, **extra)
    done = subprocess.run([*CLI, "model", "register", MODEL, str(tiny_model)], env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return environment


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def env(request: pytest.FixtureRequest, tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    url = request.getfixturevalue("postgres_url") if request.param == "postgresql" else None
    return worker_env(tmp_path, tiny_model, url)


@pytest.fixture
def services(env: dict[str, str], embedder: SentenceTransformerEmbedder) -> Iterator[Services]:
    services = build(Settings.from_env(env), embedder=embedder)
    yield services
    services.close()


def kill_worker_once(env: dict[str, str], happened: Callable[[], bool]) -> None:
    worker = subprocess.Popen([*CLI, "--quiet", "academy", "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not happened():
            assert worker.poll() is None and time.monotonic() < deadline, "the worker never got there"
            time.sleep(0.02)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait(timeout=30)


def test_workers_killed_in_a_chat_step_and_in_the_academy_step_leave_the_run_to_the_next_which_repeats_nothing(
    services: Services, env: dict[str, str]
) -> None:
    recipe = Recipes(services).define(Command(ALICE, command_metadata("alice", "t")), "crash",
                                      msgspec.convert(RECIPE, Definition))
    run_id = RecipeRuns(services).start(Command(ALICE, command_metadata("alice", "t")), recipe.id, {"name": "Ada"}).id

    def run_events() -> list:
        return [e.event for e in services.store.read_stream(run_id)]

    def started(step_id: str) -> bool:
        return any(isinstance(e, StepStarted) and e.step_id == step_id for e in run_events())

    def session_id() -> str | None:
        return next((e.awaited.stream_id for e in run_events() if isinstance(e, StepAwaiting)), None)

    def session_progressed() -> bool:
        found = session_id()
        return found is not None and any(isinstance(e.event, TrainingProgressed) for e in services.store.read_stream(found))

    kill_worker_once(env, lambda: started("chat"))
    assert not any(isinstance(e, StepCompleted) and e.step_id == "chat" for e in run_events())
    kill_worker_once(env, session_progressed)
    last = subprocess.run([*CLI, "academy", "worker", "--once"], env=env, capture_output=True, text=True, timeout=300)

    assert last.returncode == 0, last.stderr
    assert f"run {run_id}: completed" in last.stderr
    events = run_events()
    assert [(type(e).__name__, e.step_id) for e in events if isinstance(e, StepStarted | StepCompleted)] == [
        ("StepStarted", "persona"), ("StepCompleted", "persona"), ("StepStarted", "chat"), ("StepCompleted", "chat"),
        ("StepStarted", "train"), ("StepCompleted", "train"), ("StepStarted", "stack"), ("StepCompleted", "stack")]
    every = [e.type for e in services.store.read_all(limit=100_000)]
    assert (every.count("PersonaCreated"), every.count("GenomeCreated"), every.count("AcademySessionStarted")) == (1, 1, 1)
    # The chat killed mid-turn appended nothing; its second try appended one conversation.
    assert every.count("ConversationStarted") == 1
    steps = [e.event.step for e in services.store.read_stream(session_id()) if isinstance(e.event, TrainingProgressed)]
    assert steps == [5, 10]
    view = RecipeRuns(services).get(ALICE, run_id)
    [layer_id] = view.steps[2].output["layer_ids"]
    assert view.status is RunStatus.COMPLETED and view.output["layers"] == [{"layer_id": layer_id, "weight": 1.0}]


def test_recipe_run_in_the_terminal_runs_genome_assembly_and_its_academy_session_itself(
    tmp_path: Path, tiny_model: Path, embedder: SentenceTransformerEmbedder
) -> None:
    env = {**worker_env(tmp_path, tiny_model), "GENOME_ACADEMY_CHALLENGES": "1"}
    services = build(Settings.from_env(env), embedder=embedder)
    try:
        persona = Personas(services).create(Command(ALICE, command_metadata("alice", "t")), "Ada", base_model=MODEL)
    finally:
        services.close()
    done = subprocess.run([*CLI, "recipe", "run", "genome-assembly", "--owner", "alice", "--input", f"persona_id={persona.id}",
                           "--input", "goal=Sound calm.", "--input", "budget_steps=5"],
                          env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    status, output = done.stdout.strip().splitlines()[-2:]
    assert status.endswith(" completed")
    [layer] = json.loads(output)["layers"]
    for line in ("step 1/4 analyse (goal.analyse): completed", "step 2/4 attach (layers.attach): skipped: when ",
                 "step 3/4 train (academy.train): completed", "step 4/4 stack (genome.stack): completed"):
        assert line in done.stderr, done.stderr
    assert layer["weight"] == 1.0
