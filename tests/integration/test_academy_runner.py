"""A session run on the tiny random Llama: plan, curate, train, register, attach; cancel; resume."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import numpy as np
import pytest

from fixtures.make_adapter import make_adapter_files
from fixtures.make_model import tiny_spec
from genome_service.academy.runner import Runner, RunnerSettings
from genome_service.academy.worker import Worker
from genome_service.domain.academy import (
    ACADEMY_SESSION,
    ChallengeGenerated,
    ChangeSessionStatus,
    ExampleKept,
    LayerProduced,
    SessionStatus,
    StartAcademySession,
    TaskAction,
    TrainingProgressed,
)
from genome_service.domain.genome import GENOME, AttachLayer, CreateGenome, LayerFacts
from genome_service.domain.layer import LAYER, TraitType
from genome_service.domain.persona import PERSONA, AssignGenome, CreatePersona, GenomeFacts
from genome_service.eventstore.database import Database
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services, build
from genome_service.services.layers import LayerDetails, adapter_manifest, register_layer
from genome_service.services.stacks import StackResolver
from genome_service.settings import Settings
from inference.backends.base import ChatMessage
from inference.backends.torch import TorchBackend
from inference.lora.stack import assemble
from inference.training import TrainingConfig
from rag.embedder import SentenceTransformerEmbedder

MODEL = "tiny-llama"
FAST = RunnerSettings(
    challenges_per_task=4, keep_score=0.0, challenge_tokens=12, answer_tokens=16, judge_tokens=12, judge_retries=1,
    checkpoint_every=5, training=TrainingConfig(learning_rate=1e-2, warmup_steps=2, batch_size=2, seed=1),
    cancel_poll_seconds=0.05,
)


@pytest.fixture
def academy(database: Database, tmp_path: Path, tiny_model: Path,
            embedder: SentenceTransformerEmbedder) -> Iterator[Services]:
    services = build(Settings(data_dir=tmp_path, database_url=database.url), database=database, embedder=embedder)
    services.models.register_local(MODEL, tiny_model)
    services.commands.execute(PERSONA, "p1", CreatePersona("p1", "alice", "Calm Ada", system_prompt="You are calm."))
    services.commands.execute(GENOME, "g1", CreateGenome("g1", "alice", "p1", MODEL, "calm genome"))
    services.commands.execute(PERSONA, "p1", AssignGenome(GenomeFacts("g1", "p1", archived=False)))
    yield services


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TorchBackend:
    return TorchBackend(tiny_model, device="cpu")


def start(services: Services, session_id: str, steps: int) -> None:
    command = StartAcademySession(session_id, "alice", "p1", "Answer every question in a calm, gentle voice.",
                                  budget_steps=steps, budget_seconds=600.0)
    services.commands.execute(ACADEMY_SESSION, session_id, command)


def events(services: Services, session_id: str) -> list:
    return [e.event for e in services.store.read_stream(session_id)]


def test_a_session_trains_registers_and_attaches_a_layer_that_changes_the_output(
    academy: Services, backend: TorchBackend, tiny_model: Path
) -> None:
    start(academy, "s1", steps=20)

    final = Runner(academy, backend, MODEL, FAST).run("s1")

    assert final.status is SessionStatus.COMPLETED, final.reason
    assert final.tasks is not None and final.tasks[0].action is TaskAction.TRAIN
    history = events(academy, "s1")
    kept = [e for e in history if isinstance(e, ExampleKept)]
    assert len(kept) == 4 and [e.level for e in kept] == [1, 1, 2, 3]
    assert [m.role for m in kept[0].messages] == ["system", "user", "assistant"]
    progress = [e for e in history if isinstance(e, TrainingProgressed)]
    assert [e.step for e in progress] == [5, 10, 15, 20]
    assert progress[-1].loss < progress[0].loss
    [produced] = [e for e in history if isinstance(e, LayerProduced)]
    layer = academy.repository.load(LAYER, produced.layer_id).state
    assert layer is not None and layer.owner == "alice" and layer.base_model == MODEL
    assert layer.training_metrics is not None and layer.training_metrics.steps == 20
    genome = academy.repository.load(GENOME, "g1").state
    assert genome is not None and [(r.layer_id, r.weight) for r in genome.layers] == [(produced.layer_id, 1.0)]
    adapter = StackResolver(academy, academy.models.get(MODEL)).load_adapter(produced.layer_id)
    ids = backend.encode_chat([ChatMessage("user", "How are you?")])
    stack = assemble([(produced.layer_id, 1.0, adapter.canonical, adapter.scale)])
    assert not np.allclose(backend.logits(ids, None), backend.logits(ids, stack), atol=1e-3)


def test_a_second_run_of_a_finished_session_changes_nothing(academy: Services, backend: TorchBackend) -> None:
    start(academy, "s1", steps=5)
    runner = Runner(academy, backend, MODEL, FAST)
    assert runner.run("s1").status is SessionStatus.COMPLETED
    before = academy.store.stream_version("s1")
    assert runner.run("s1").status is SessionStatus.COMPLETED
    assert academy.store.stream_version("s1") == before


def cancel_once_seen(academy: Services, runner: Runner, kind: type) -> tuple[float, object]:
    """Run s1 on a thread, cancel it once an event of `kind` is recorded; (seconds to stop, final state)."""
    done: list = []
    thread = threading.Thread(target=lambda: done.append(runner.run("s1")))
    thread.start()
    deadline = time.monotonic() + 120
    while not any(isinstance(e, kind) for e in events(academy, "s1")):
        assert time.monotonic() < deadline and thread.is_alive(), f"no {kind.__name__} was recorded"
        time.sleep(0.05)
    asked = time.monotonic()
    academy.commands.execute(ACADEMY_SESSION, "s1", ChangeSessionStatus(SessionStatus.CANCELLED, "user asked"))
    thread.join(timeout=30)
    assert not thread.is_alive()
    return time.monotonic() - asked, done[0]


def test_cancel_stops_a_training_session_within_seconds_and_registers_no_layer(
    academy: Services, backend: TorchBackend
) -> None:
    start(academy, "s1", steps=100_000)

    seconds, final = cancel_once_seen(academy, Runner(academy, backend, MODEL, FAST), TrainingProgressed)

    assert seconds < 5 and final.status is SessionStatus.CANCELLED
    assert not any(isinstance(e, LayerProduced) for e in events(academy, "s1"))
    assert academy.repository.load(GENOME, "g1").state.layers == ()


def test_cancel_during_challenges_and_judging_stops_within_seconds(academy: Services, backend: TorchBackend) -> None:
    start(academy, "s1", steps=10)
    slow = msgspec.structs.replace(FAST, challenges_per_task=500, answer_tokens=256, judge_tokens=256)

    seconds, final = cancel_once_seen(academy, Runner(academy, backend, MODEL, slow), ChallengeGenerated)

    assert seconds < 5 and final.status is SessionStatus.CANCELLED
    assert not any(isinstance(e, TrainingProgressed) for e in events(academy, "s1"))


def test_an_unexpected_error_fails_the_session_with_its_reason_and_the_worker_goes_on(
    academy: Services, backend: TorchBackend, tiny_model: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A genome whose layer's weights blob is gone from disk: answering as the persona hits an OSError.
    files = make_adapter_files("peft", spec=tiny_spec(tiny_model, MODEL))
    details = LayerDetails(name="lost", base_model=MODEL, trait_type=TraitType.TONE_AND_VOICE)
    layer_id = register_layer(academy, "alice", details, files, EventMetadata(actor="alice")).aggregate.stream_id
    academy.commands.execute(GENOME, "g1", AttachLayer(LayerFacts(layer_id, MODEL, deprecated=False), 1.0))
    academy.blobs.path(hashlib.sha256(files["adapter_model.safetensors"]).hexdigest()).unlink()
    start(academy, "s1", steps=5)
    academy.commands.execute(PERSONA, "p2", CreatePersona("p2", "alice", "Bo", system_prompt="You are brisk."))
    academy.commands.execute(GENOME, "g2", CreateGenome("g2", "alice", "p2", MODEL, "brisk genome"))
    academy.commands.execute(PERSONA, "p2", AssignGenome(GenomeFacts("g2", "p2", archived=False)))
    academy.commands.execute(ACADEMY_SESSION, "s2", StartAcademySession("s2", "alice", "p2", "Be brief.", budget_steps=5))
    finished: list = []

    with caplog.at_level(logging.ERROR, logger="genome_service.academy"):
        Worker(academy, lambda: Runner(academy, backend, MODEL, FAST)).run(
            threading.Event(), until_idle=True, on_finished=finished.append)

    assert [(s.session_id, s.status) for s in finished] == [("s1", SessionStatus.FAILED), ("s2", SessionStatus.COMPLETED)]
    assert finished[0].reason.startswith("FileNotFoundError: ")
    [record] = caplog.records
    assert "s1" in record.getMessage() and "FileNotFoundError" in record.getMessage() and "Traceback" not in record.getMessage()
    assert "load_adapter" in record.getMessage() and "calm, gentle voice" not in caplog.text


def test_a_goal_of_several_needs_plans_one_task_each_and_they_share_the_step_budget(
    academy: Services, backend: TorchBackend, tiny_model: Path
) -> None:
    # An existing layer made for the first need is used as is; the others are trained from scratch.
    files = make_adapter_files("peft", spec=tiny_spec(tiny_model, MODEL))
    warm_voice = "Speak in a warm, gentle voice."
    details = LayerDetails(name=warm_voice, base_model=MODEL, trait_type=TraitType.TONE_AND_VOICE,
                           description=warm_voice)
    warm = register_layer(academy, "alice", details, files, EventMetadata(actor="alice")).aggregate.stream_id
    needs = (warm_voice, "Explain calculus and algebra precisely.", "Respect the customs and traditions of every culture.")
    academy.commands.execute(ACADEMY_SESSION, "s1", StartAcademySession(
        "s1", "alice", "p1", " ".join(needs), target_similarity=0.75, budget_steps=11, budget_seconds=600.0))

    final = Runner(academy, backend, MODEL, FAST).run("s1")

    assert final.status is SessionStatus.COMPLETED, final.reason
    use, first, second = final.tasks
    assert (use.action, use.layer_id) == (TaskAction.USE, warm)
    assert (first.action, second.action) == (TaskAction.TRAIN, TaskAction.TRAIN)
    assert (use.need, first.need, second.need) == needs and first.trait_type != second.trait_type
    history = events(academy, "s1")
    challenges = [e for e in history if isinstance(e, ChallengeGenerated)]
    assert [(e.task_id, e.criteria) for e in challenges] == [("t2", (needs[1],))] * 4 + [("t3", (needs[2],))] * 4
    # The 11 steps of the budget split over the two trainings: 6 and 5.
    progress = [(e.task_id, e.step) for e in history if isinstance(e, TrainingProgressed)]
    assert progress == [("t2", 5), ("t2", 6), ("t3", 5)]
    produced = [e.layer_id for e in history if isinstance(e, LayerProduced)]
    genome = academy.repository.load(GENOME, "g1").state
    assert len(produced) == 2 and [r.layer_id for r in genome.layers] == [warm, *produced]


def test_a_session_on_the_mlx_backend_trains_with_mlx_lm_and_registers_an_mlx_lm_adapter(
    academy: Services, tiny_model: Path
) -> None:
    pytest.importorskip("mlx_lm")
    from inference.backends.mlx import MlxBackend

    mlx = MlxBackend(tiny_model)
    start(academy, "s1", steps=10)

    final = Runner(academy, mlx, MODEL, FAST).run("s1")

    assert final.status is SessionStatus.COMPLETED, final.reason
    progress = [e for e in events(academy, "s1") if isinstance(e, TrainingProgressed)]
    assert [e.step for e in progress] == [5, 10] and progress[-1].loss < progress[0].loss
    [layer_id] = [layer for _, layer in final.finished_tasks]
    adapter = StackResolver(academy, academy.models.get(MODEL)).load_adapter(layer_id)
    layer = academy.repository.load(LAYER, layer_id).state
    assert layer is not None and set(adapter_manifest(academy, layer.adapter_sha256).files) == {
        "adapters.safetensors", "adapter_config.json"}  # mlx-lm's layout
    ids = mlx.encode_chat([ChatMessage("user", "How are you?")])
    stack = assemble([(layer_id, 1.0, adapter.canonical, adapter.scale)])
    assert not np.allclose(mlx.logits(ids, None), mlx.logits(ids, stack), atol=1e-3)
