"""Academy workers as their own processes: a SIGKILLed worker's session is finished by the next one,
and no recorded step runs twice; a SIGTERMed worker exits 0 and leaves its session to resume;
`academy run` trains with a loss plot; bad input exits 1."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from servers import CLI, clean_env

from genome_service.domain.academy import (
    ACADEMY_SESSION,
    ChallengeGenerated,
    LayerProduced,
    ResponseScored,
    SessionStatus,
    StartAcademySession,
    TrainingProgressed,
)
from genome_service.domain.genome import GENOME, CreateGenome
from genome_service.domain.persona import PERSONA, AssignGenome, CreatePersona, GenomeFacts
from genome_service.eventstore.migrations import upgrade
from genome_service.services.bootstrap import Services, build
from genome_service.settings import Settings
from rag.embedder import SentenceTransformerEmbedder

MODEL = "tiny-llama"
ACADEMY = {
    "GENOME_INFERENCE_MODEL": MODEL, "GENOME_INFERENCE_BACKEND": "torch", "GENOME_INFERENCE_DEVICE": "cpu",
    "GENOME_ACADEMY_CHALLENGES": "3", "GENOME_ACADEMY_KEEP_SCORE": "0", "GENOME_ACADEMY_LEARNING_RATE": "0.01",
    "GENOME_ACADEMY_CHECKPOINT_EVERY": "5", "HF_HUB_OFFLINE": "1",
}


@pytest.fixture
def env(tmp_path: Path, tiny_model: Path) -> dict[str, str]:
    environment = clean_env(tmp_path, **ACADEMY)
    (tmp_path / "data").mkdir()
    upgrade(f"sqlite:///{tmp_path / 'data' / 'genome.db'}")
    done = subprocess.run([*CLI, "model", "register", MODEL, str(tiny_model)], env=environment,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return environment


@pytest.fixture
def services(tmp_path: Path, env: dict[str, str], embedder: SentenceTransformerEmbedder) -> Iterator[Services]:
    services = build(Settings.from_env(env), embedder=embedder)
    services.commands.execute(PERSONA, "p1", CreatePersona("p1", "alice", "Calm Ada", system_prompt="You are calm."))
    services.commands.execute(GENOME, "g1", CreateGenome("g1", "alice", "p1", MODEL, "calm genome"))
    services.commands.execute(PERSONA, "p1", AssignGenome(GenomeFacts("g1", "p1", archived=False)))
    yield services
    services.close()


def events(services: Services, session_id: str) -> list:
    return [e.event for e in services.store.read_stream(session_id)]


def test_a_worker_killed_mid_training_leaves_the_session_to_the_next_which_runs_no_step_twice(
    services: Services, env: dict[str, str]
) -> None:
    goal = "Answer every question in a calm, gentle voice."
    services.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession("s1", "alice", "p1", goal, budget_steps=40))
    first = subprocess.Popen([*CLI, "--quiet", "academy", "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        while not any(isinstance(e, TrainingProgressed) and e.step >= 10 for e in events(services, "s1")):
            assert first.poll() is None and time.monotonic() < deadline, "the first worker never reached step 10"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait(timeout=30)
    before = events(services, "s1")
    steps_before = [e.step for e in before if isinstance(e, TrainingProgressed)]
    assert services.repository.load(ACADEMY_SESSION, "s1").state.status is SessionStatus.RUNNING

    second = subprocess.run([*CLI, "academy", "worker", "--once"], env=env, capture_output=True, text=True,
                            timeout=300)

    assert second.returncode == 0, second.stderr
    assert "session s1: completed" in second.stderr
    after = events(services, "s1")
    steps = [e.step for e in after if isinstance(e, TrainingProgressed)]
    assert steps[: len(steps_before)] == steps_before and steps == sorted(set(steps)) and steps[-1] == 40
    challenges = [e.challenge_id for e in after if isinstance(e, ChallengeGenerated)]
    scored = [e.challenge_id for e in after if isinstance(e, ResponseScored)]
    assert challenges == sorted(set(challenges)) and len(challenges) == 3 and sorted(scored) == challenges
    assert len([e for e in after if isinstance(e, LayerProduced)]) == 1


def test_a_worker_sent_sigterm_mid_training_exits_0_promptly_and_its_session_resumes_elsewhere(
    services: Services, env: dict[str, str], tmp_path: Path
) -> None:
    goal = "Answer every question in a calm, gentle voice."
    services.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession("s1", "alice", "p1", goal, budget_steps=40))
    log = tmp_path / "worker.log"
    with log.open("w") as stderr:
        first = subprocess.Popen([*CLI, "academy", "worker"], env=env, stderr=stderr)
    try:
        deadline = time.monotonic() + 180
        while not any(isinstance(e, TrainingProgressed) and e.step >= 10 for e in events(services, "s1")):
            assert first.poll() is None and time.monotonic() < deadline, "the worker never reached step 10"
            time.sleep(0.05)
        sent = time.monotonic()
        first.send_signal(signal.SIGTERM)
        status = first.wait(timeout=60)
        waited = time.monotonic() - sent
    finally:
        first.kill()
        first.wait(timeout=30)

    # One tiny-model step or generated token is well under a second; 15 s leaves room for a busy machine.
    assert status == 0 and waited < 15, (status, waited, log.read_text())
    assert log.read_text().splitlines()[-1].startswith("academy worker: stopped by SIGTERM")
    state = services.repository.load(ACADEMY_SESSION, "s1").state
    assert state.status is SessionStatus.RUNNING and not state.reason
    steps_before = [e.step for e in events(services, "s1") if isinstance(e, TrainingProgressed)]
    assert steps_before[-1] < 40

    second = subprocess.run([*CLI, "academy", "worker", "--once"], env=env, capture_output=True, text=True,
                            timeout=300)

    assert second.returncode == 0, second.stderr
    assert "session s1: completed" in second.stderr
    steps = [e.step for e in events(services, "s1") if isinstance(e, TrainingProgressed)]
    assert steps[: len(steps_before)] == steps_before and steps == sorted(set(steps)) and steps[-1] == 40


def test_a_resumed_session_is_held_to_the_time_budget_its_first_worker_started(
    services: Services, env: dict[str, str]
) -> None:
    budget = 36.0
    services.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession(
        "s1", "alice", "p1", "Answer every question in a calm, gentle voice.", budget_steps=100_000,
        budget_seconds=budget))
    first = subprocess.Popen([*CLI, "--quiet", "academy", "worker"], env=env, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 180
        # Killed with at most a third of the budget left: all the next worker may train.
        while not any(isinstance(e, TrainingProgressed) and e.seconds >= budget * 2 / 3 for e in events(services, "s1")):
            assert first.poll() is None and time.monotonic() < deadline, "the first worker never spent its budget"
            time.sleep(0.05)
        os.kill(first.pid, signal.SIGKILL)
    finally:
        first.kill()
        first.wait(timeout=30)
    resumed_at = datetime.now(UTC)

    second = subprocess.run([*CLI, "academy", "worker", "--once"], env=env, capture_output=True, text=True,
                            timeout=300)

    assert second.returncode == 0, second.stderr
    history = services.store.read_stream("s1")
    state = services.repository.load(ACADEMY_SESSION, "s1").state
    assert state.status is SessionStatus.FAILED and "time budget of 36 s ran out" in state.reason
    # The budget is checked before each step: the step under way when it ends may finish.
    assert all(e.event.seconds < budget + 2 for e in history if isinstance(e.event, TrainingProgressed))
    # Starting up and at most a third of the budget: a fresh budget would train 36 s alone.
    assert (history[-1].recorded_at - resumed_at).total_seconds() < budget * 5 / 6


def test_academy_run_trains_a_layer_and_plots_the_loss(services: Services, env: dict[str, str], tmp_path: Path) -> None:
    plot = tmp_path / "loss.png"
    done = subprocess.run(
        [*CLI, "--quiet", "academy", "run", "--persona", "p1", "--goal", "Sound calm.", "--steps", "10",
         "--plot", str(plot)], env=env, capture_output=True, text=True, timeout=300,
    )
    assert done.returncode == 0, done.stderr
    session_id, status = done.stdout.split()
    assert status == "completed" and plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [e.step for e in events(services, session_id) if isinstance(e, TrainingProgressed)] == [5, 10]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--persona", "nobody", "--goal", "x"], "persona 'nobody' does not exist"),
        (["--persona", "p1", "--goal", "  "], "goal must not be empty"),
        (["--persona", "p1", "--goal", "x", "--steps", "0"], "budget_steps must be in 1..100000 (got 0)"),
    ],
)
def test_academy_run_refuses_bad_input_with_exit_1_and_appends_nothing(
    services: Services, env: dict[str, str], args: list[str], message: str
) -> None:
    before = services.store.last_position()
    done = subprocess.run([*CLI, "academy", "run", *args], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and message in done.stderr
    assert services.store.last_position() == before
