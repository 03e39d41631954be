"""Knowledge distilled into a layer on the tiny random Llama: held-out evaluation before, at each
checkpoint and after training, the task score measured with and without the layer, and the layer
attached only when it improved the persona."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from genome_service.academy.runner import Runner, RunnerSettings
from genome_service.domain.academy import (
    ACADEMY_SESSION,
    AttachDecided,
    DataPrepared,
    DataSource,
    Evaluated,
    LayerProduced,
    SessionStatus,
    StartAcademySession,
    TrainingData,
)
from genome_service.domain.common import DomainError
from genome_service.domain.genome import GENOME, CreateGenome
from genome_service.domain.layer import LAYER, ChangeLayerDetails
from genome_service.domain.persona import PERSONA, AssignGenome, CreatePersona, GenomeFacts
from genome_service.eventstore.database import Database
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services, build
from genome_service.services.knowledge import add_knowledge
from genome_service.settings import Settings
from inference.backends.torch import TorchBackend
from inference.training import TrainingConfig
from rag.embedder import SentenceTransformerEmbedder

MODEL = "tiny-llama"
FACTS = ("The capital of Zorbania is Quillfort. The Mirelan river flows 412 kilometres. "
         "The painter Ilva Done was born in Tesk.")
TEACH = RunnerSettings(checkpoint_every=10, answer_tokens=8, score_tokens=8, cancel_poll_seconds=0.05,
                       training=TrainingConfig(learning_rate=2e-2, warmup_steps=2, batch_size=4, seed=1,
                                               target_modules=("q_proj", "k_proj", "v_proj", "o_proj")))


@pytest.fixture
def academy(database: Database, tmp_path: Path, tiny_model: Path, embedder: SentenceTransformerEmbedder) -> Iterator[Services]:
    services = build(Settings(data_dir=tmp_path, database_url=database.url), database=database, embedder=embedder)
    services.models.register_local(MODEL, tiny_model)
    services.commands.execute(PERSONA, "p1", CreatePersona("p1", "alice", "Ada", system_prompt="You are Ada."))
    services.commands.execute(GENOME, "g1", CreateGenome("g1", "alice", "p1", MODEL, "ada's genome"))
    services.commands.execute(PERSONA, "p1", AssignGenome(GenomeFacts("g1", "p1", archived=False)))
    add_knowledge(services, "alice", "p1", "facts", "text/plain", FACTS, EventMetadata(actor="alice"))
    yield services


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TorchBackend:
    return TorchBackend(tiny_model, device="cpu")


def run(services: Services, backend: TorchBackend, steps: int, settings: RunnerSettings = TEACH, **data: object):
    session = StartAcademySession("s1", "alice", "p1", "Know the facts.", budget_steps=steps, budget_seconds=600.0,
                                  data=TrainingData(sources=(DataSource.KNOWLEDGE,), **data))  # type: ignore[arg-type]
    services.commands.execute(ACADEMY_SESSION, "s1", session)
    final = Runner(services, backend, MODEL, settings).run("s1")
    assert final.status is SessionStatus.COMPLETED, final.reason
    return final, [e.event for e in services.store.read_stream("s1")]


def test_knowledge_is_distilled_evaluated_and_the_improved_layer_attached(academy: Services, backend: TorchBackend) -> None:
    final, history = run(academy, backend, steps=60)

    [prepared] = [e for e in history if isinstance(e, DataPrepared)]
    assert prepared.validation == "heldout_form"
    assert [(s.source, s.examples, s.heldout) for s in prepared.sets] == [(DataSource.KNOWLEDGE, 6, 3)]
    evaluations = [e for e in history if isinstance(e, Evaluated)]
    assert [(e.step, e.phase) for e in evaluations] == [(0, "before"), (10, "checkpoint"), (20, "checkpoint"),
                                                        (30, "checkpoint"), (40, "checkpoint"), (50, "checkpoint"),
                                                        (60, "after")]
    before, after = evaluations[0], evaluations[-1]
    assert after.valid_loss < before.valid_loss
    assert before.task_score is not None and after.task_score is not None and after.heldout_task_score is not None
    # The random model recalls none of the facts closed-book; the layer makes it recall some.
    assert before.task_score == 0.0 and after.task_score > 0.0
    [decided] = [e for e in history if isinstance(e, AttachDecided)]
    [produced] = [e for e in history if isinstance(e, LayerProduced)]
    assert decided.attached and decided.reason.startswith("attached: the task score went from 0.000 to"), decided.reason
    genome = academy.repository.load(GENOME, "g1").state
    assert [r.layer_id for r in genome.layers] == [produced.layer_id]
    layer = academy.repository.load(LAYER, produced.layer_id).state
    assert layer.personal_of == "p1"
    with pytest.raises(DomainError) as refused:
        academy.commands.execute(LAYER, produced.layer_id, ChangeLayerDetails(public=True))
    assert refused.value.rule == "public_not_allowed"


def test_a_layer_that_did_not_improve_the_persona_is_left_unattached_and_the_events_say_why(
    academy: Services, backend: TorchBackend
) -> None:
    timid = msgspec.structs.replace(TEACH, training=msgspec.structs.replace(TEACH.training, learning_rate=1e-7))

    final, history = run(academy, backend, steps=1, settings=timid)

    [before, after] = [e for e in history if isinstance(e, Evaluated)]
    assert (before.phase, after.phase, after.step) == ("before", "after", 1)
    assert after.task_score == before.task_score == 0.0
    [decided] = [e for e in history if isinstance(e, AttachDecided)]
    assert not decided.attached
    assert decided.reason == "not attached: the task score went from 0.000 to 0.000 (+0.000; the margin is 0.02)"
    assert academy.repository.load(GENOME, "g1").state.layers == ()
    assert [layer for _, layer in final.finished_tasks] == [decided.layer_id]


def test_attach_if_improved_off_attaches_whatever_the_evaluation_says(academy: Services, backend: TorchBackend) -> None:
    timid = msgspec.structs.replace(TEACH, training=msgspec.structs.replace(TEACH.training, learning_rate=1e-7))

    _, history = run(academy, backend, steps=1, settings=timid, attach_if_improved=False)

    [decided] = [e for e in history if isinstance(e, AttachDecided)]
    assert decided.attached and decided.reason == "attach_if_improved is off: attached without comparing"
    assert [r.layer_id for r in academy.repository.load(GENOME, "g1").state.layers] == [decided.layer_id]


def test_a_configured_teacher_is_asked_for_pairs_and_the_record_names_it(
    database: Database, tmp_path: Path, tiny_model: Path, embedder: SentenceTransformerEmbedder, backend: TorchBackend
) -> None:
    settings = Settings(data_dir=tmp_path, database_url=database.url, academy_teacher_backend="torch",
                        academy_teacher_model=MODEL, inference_device="cpu")
    services = build(settings, database=database, embedder=embedder)
    services.models.register_local(MODEL, tiny_model)
    services.commands.execute(PERSONA, "p1", CreatePersona("p1", "alice", "Ada", system_prompt="You are Ada."))
    services.commands.execute(GENOME, "g1", CreateGenome("g1", "alice", "p1", MODEL, "ada's genome"))
    services.commands.execute(PERSONA, "p1", AssignGenome(GenomeFacts("g1", "p1", archived=False)))
    add_knowledge(services, "alice", "p1", "facts", "text/plain", FACTS, EventMetadata(actor="alice"))
    teaching = msgspec.structs.replace(TEACH, training=msgspec.structs.replace(TEACH.training, learning_rate=1e-7))

    _, history = run(services, backend, steps=1, settings=teaching)

    [prepared] = [e for e in history if isinstance(e, DataPrepared)]
    # The random tiny model writes no grounded pair: what it said is read, and nothing invented is kept.
    assert (prepared.teacher, prepared.teacher_pairs) == (f"torch:{MODEL}", 0)
    assert [(s.source, s.examples, s.heldout) for s in prepared.sets] == [(DataSource.KNOWLEDGE, 6, 3)]
