"""Runs one academy session to its end, from whatever its events say is already done.

Every step reads the session's state first and appends its result as an event, so a run
that starts again after a crash skips what is recorded: the plan, each challenge (ids are
derived from the task and its ordinal), each score, each kept example, each checkpointed
training step (the trainer resumes from the newest checkpoint on disk, and a step is
recorded only once its checkpoint is there), the layer (registered under an idempotency
key) and the attachment. A run stops within a training step or one generation of the
session being cancelled, or of `stopping` being set (the session then stays running, to resume).
"""

from __future__ import annotations

import logging
import math
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NamedTuple

import msgspec

from genome_service.academy import distill, teacher
from genome_service.academy.analysis import Analysis
from genome_service.academy.judge import Judgement, complete, judge, rubric_score
from genome_service.domain.academy import (
    ACADEMY_SESSION,
    MAX_NEEDS,
    TERMINAL,
    AcademySession,
    Challenge,
    ChangeSessionStatus,
    DataSet,
    DataSource,
    DecideAttach,
    Difficulty,
    ExampleKept,
    ExampleMessage,
    KeepExample,
    MakePlan,
    PlanTask,
    PrepareData,
    RecordChallenge,
    RecordEvaluation,
    RecordLayerProduced,
    RecordLayerReused,
    RecordTrainingProgress,
    ScoreResponse,
    SessionStatus,
    TaskAction,
    goal_needs,
)
from genome_service.domain.common import DomainError
from genome_service.domain.genome import GENOME, AttachLayer, LayerFacts
from genome_service.domain.layer import LAYER, RecordTrainingMetrics, TraitType, TrainingMetrics
from genome_service.eventstore.records import EventMetadata
from genome_service.services.academy_sessions import AcademySessions
from genome_service.services.blobs import shred
from genome_service.services.bootstrap import Services
from genome_service.services.genomes import Genomes
from genome_service.services.knowledge import persona_texts
from genome_service.services.layers import LayerDetails, register_layer
from genome_service.services.stacks import StackResolver
from genome_service.services.training_files import file_dataset
from genome_service.settings import Settings
from inference.backends.base import Backend, ChatMessage, Sampling, never_cancelled
from inference.models import DEFAULT_MODEL
from inference.training import Evaluation, Example, TrainingConfig, data_sha256, train_lora
from inference.training.mlx import train_lora_mlx

DEFAULT_SYSTEM = "You are a helpful assistant."
log = logging.getLogger("genome_service.academy")
# Without a validation set of its own, every SPLIT_EVERY-th example is held out.
SPLIT_EVERY = 5


class TaskData(NamedTuple):
    """What one training task learns from and is judged on."""

    examples: list[Example]
    validation: list[Example]
    facts: list[distill.Fact]  # knowledge: what the task score asks for (empty: no task score)
    system: str


class RunnerSettings(msgspec.Struct, frozen=True, kw_only=True):
    challenges_per_task: int = 12
    keep_score: float = 50.0  # examples scored below this are not trained on
    refine_similarity: float = 0.75  # a layer this close (but under the target) is refined
    challenge_tokens: int = 48
    answer_tokens: int = 64
    judge_tokens: int = 64
    judge_retries: int = 2
    checkpoint_every: int = 5  # also how often a progress event is appended
    layer_weight: float = 1.0
    training: TrainingConfig = TrainingConfig(learning_rate=1e-3, warmup_steps=2)
    cancel_poll_seconds: float = 0.5
    attach_margin: float = 0.02  # the improvement a layer must show to be attached
    score_tokens: int = 24  # greedy tokens of each answer the task score reads
    scored_facts: int = 64  # the task score asks at most this many facts
    judge: str = "model"  # or "rubric" (GENOME_ACADEMY_JUDGE)
    # A knowledge session's layer adapts every projection: facts are stored in the MLPs as
    # much as in attention, and a small model learns them far faster with both.
    knowledge_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    @classmethod
    def from_settings(cls, settings: Settings) -> RunnerSettings:
        return cls(
            challenges_per_task=settings.academy_challenges,
            keep_score=settings.academy_keep_score,
            checkpoint_every=settings.academy_checkpoint_every,
            attach_margin=settings.academy_attach_margin,
            judge=judge_of(settings),
            training=TrainingConfig(learning_rate=settings.academy_learning_rate, warmup_steps=2,
                                    device=settings.inference_device),
        )


def judge_of(settings: Settings) -> str:
    """The judge GENOME_ACADEMY_JUDGE names; auto: the rubric on the bundled small model."""
    if settings.academy_judge != "auto":
        return settings.academy_judge
    return "rubric" if settings.inference_model == DEFAULT_MODEL else "model"


class SessionCancelled(Exception):
    """The session was cancelled while this run worked on it."""


class RunStopped(Exception):
    """The runner's process is shutting down: the session stays running for a worker to resume."""


class Runner:
    """Runs sessions on one loaded model; `backend` serves the session's base model."""

    def __init__(self, services: Services, backend: Backend, model_name: str, settings: RunnerSettings,
                 *, stopping: threading.Event | None = None, stacks: StackResolver | None = None) -> None:
        self.services = services
        self.backend = backend
        self.model_name = model_name
        self.settings = settings
        self.stopping = stopping or threading.Event()
        # The backend's resolver where it takes stacks by reference (the inference daemon).
        self.stacks = stacks or StackResolver(services, services.models.get(model_name))
        self.genomes, self.sessions = Genomes(services), AcademySessions(services)
        self._teacher: tuple[Backend, str] | None | bool = False  # False: not opened yet

    # --- the session --------------------------------------------------------------------

    def run(self, session_id: str) -> AcademySession:
        """Run the session to completed, failed or cancelled; return its final state."""
        state = self._state(session_id)
        if state.status in TERMINAL:
            return state
        self._execute(session_id, ChangeSessionStatus(SessionStatus.RUNNING))
        try:
            self._check_model(state)
            state = self._plan(self._state(session_id))
            for task in state.tasks or ():
                # A task whose layer was produced but not yet judged (a crash came between) runs
                # again: training resumes at its last checkpoint and goes straight to the result.
                unjudged = task.action is not TaskAction.USE and state.decision(task.task_id) is None
                if task.task_id not in dict(state.finished_tasks) or unjudged:
                    self._run_task(session_id, task)
            self._execute(session_id, ChangeSessionStatus(SessionStatus.COMPLETED))
        except (SessionCancelled, RunStopped):
            pass
        except (DomainError, ValueError, RuntimeError) as exc:
            self._fail(session_id, f"{type(exc).__name__}: {exc}")
        except Exception as exc:  # noqa: BLE001 - a bug or a broken store must end the session, not the worker
            # The frames only: a message may quote the goal, prompts or answers, which stay out of logs.
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("academy session %s failed on an unexpected %s\n%s", session_id, type(exc).__name__, frames)
            self._fail(session_id, f"{type(exc).__name__}: {exc}")
        return self._state(session_id)

    def _check_model(self, state: AcademySession) -> None:
        if not state.persona_id:
            if state.data.base_model != self.model_name:
                raise RuntimeError(f"the session trains on {state.data.base_model!r}; this worker runs {self.model_name!r}")
            return
        genome = self.genomes.of_persona(state.persona_id)
        if genome is None:
            raise RuntimeError(f"persona {state.persona_id} has no genome to train a layer for")
        if genome.base_model != self.model_name:
            raise RuntimeError(f"persona {state.persona_id}'s genome is on {genome.base_model!r}; "
                               f"this worker runs {self.model_name!r}")

    def _fail(self, session_id: str, reason: str) -> None:
        try:
            self._execute(session_id, ChangeSessionStatus(SessionStatus.FAILED, reason[:2000]))
        except DomainError:
            pass  # cancelled meanwhile: that status stands

    def _state(self, session_id: str) -> AcademySession:
        state = self.services.repository.load(ACADEMY_SESSION, session_id).state
        if state is None:
            raise DomainError("academy_session_not_found", f"academy session {session_id!r} does not exist")
        return state

    def _execute(self, session_id: str, command: object, key: str | None = None) -> None:
        metadata = EventMetadata(actor="academy", idempotency_key=key)
        self.services.commands.execute(ACADEMY_SESSION, session_id, command, metadata=metadata)

    def _cancel_check(self, session_id: str) -> Callable[[], bool]:
        """For generation and training loops: raises SessionCancelled, asking the database at most
        every `cancel_poll_seconds` (a loop calls it every token or step)."""
        last = [time.monotonic()]

        def check() -> bool:
            if self.stopping.is_set():
                raise RunStopped(session_id)
            now = time.monotonic()
            if now - last[0] >= self.settings.cancel_poll_seconds:
                last[0] = now
                self._check_cancelled(session_id)
            return False

        return check

    def _check_cancelled(self, session_id: str) -> None:
        if self.stopping.is_set():
            raise RunStopped(session_id)
        if self.sessions.status(session_id) is SessionStatus.CANCELLED:
            raise SessionCancelled(session_id)

    # --- challenges on demand (the API) ------------------------------------------------------

    def add_challenge(self, session_id: str, trait: TraitType, difficulty: Difficulty,
                      metadata: EventMetadata) -> Challenge:
        """A model-written challenge recorded in the session (checked first: no generation for a refusal)."""
        state = self._state(session_id)
        challenge_id = f"x{len(state.challenges)}-{uuid.uuid4().hex[:8]}"
        ACADEMY_SESSION.decide(RecordChallenge(challenge_id, trait, difficulty, "check"), state)
        prompt = self._generate_challenge(state.goal, trait, difficulty, len(state.challenges))
        command = RecordChallenge(challenge_id, trait, difficulty, prompt, (state.goal,))
        self.services.commands.execute(ACADEMY_SESSION, session_id, command, metadata=metadata)
        challenge = self._state(session_id).challenge(challenge_id)
        assert challenge is not None
        return challenge

    def score_response(self, session_id: str, challenge_id: str, response: str,
                       metadata: EventMetadata) -> Judgement:
        """Judge an answer to one of the session's challenges; kept as an example when it scores enough."""
        state = self._state(session_id)
        ACADEMY_SESSION.decide(ScoreResponse(challenge_id, response, 0.0, "check", "model"), state)
        challenge = state.challenge(challenge_id)
        assert challenge is not None
        verdict = self._judge(challenge.prompt, challenge.criteria, response)
        command = ScoreResponse(challenge_id, response, verdict.score, verdict.rationale, verdict.judge)
        self.services.commands.execute(ACADEMY_SESSION, session_id, command, metadata=metadata)
        if verdict.score >= self.settings.keep_score:
            system, _ = self.stacks.persona(state.persona_id)
            messages = (ExampleMessage("system", system.strip() or DEFAULT_SYSTEM),
                        ExampleMessage("user", challenge.prompt), ExampleMessage("assistant", response))
            self._execute(session_id, KeepExample(challenge_id, messages))
        return verdict

    # --- plan -----------------------------------------------------------------------------

    def _plan(self, state: AcademySession) -> AcademySession:
        """One task per need of the goal; needs that come to the same decision share a task."""
        if state.tasks is not None:
            return state
        if state.data.sources != (DataSource.CHALLENGES,):
            # Data given (a file, the knowledge): one layer learns all of it.
            trait = TraitType.DOMAIN_EXPERTISE if DataSource.KNOWLEDGE in state.data.sources else TraitType.GENERAL_REASONING
            self._execute(state.session_id, MakePlan((PlanTask("t1", trait, TaskAction.TRAIN, need=state.goal),)))
            return self._state(state.session_id)
        tasks: dict[tuple[object, ...], PlanTask] = {}
        # Needs given when the session was started (a recipe's) are planned as they are.
        needs = state.needs or goal_needs(state.goal, min(MAX_NEEDS, state.budget_steps))
        for need in needs:
            task = self._task(state, need, f"t{len(tasks) + 1}")
            key = (task.action, task.layer_id) if task.layer_id else (task.action, task.trait_type)
            same = tasks.get(key)
            tasks[key] = task if same is None else msgspec.structs.replace(same, need=f"{same.need} {need}")
        self._execute(state.session_id, MakePlan(tuple(tasks.values())))
        return self._state(state.session_id)

    def _task(self, state: AcademySession, need: str, task_id: str) -> PlanTask:
        """Use the nearest layer as is, refine it, or train from scratch, by its similarity to the need."""
        found = Analysis(self.services, state.owner, self.model_name).need(need)
        best = found.layers[0] if found.layers else None
        if best is None or best.similarity < self.settings.refine_similarity:
            return PlanTask(task_id, found.trait_type, TaskAction.TRAIN, need=need)
        action = TaskAction.USE if best.similarity >= state.target_similarity else TaskAction.REFINE
        return PlanTask(task_id, found.trait_type, action, best.layer_id, best.similarity, need)

    # --- one task -------------------------------------------------------------------------

    def _run_task(self, session_id: str, task: PlanTask) -> None:
        state = self._state(session_id)
        if task.action is TaskAction.USE:
            assert task.layer_id is not None
            self._execute(session_id, RecordLayerReused(task.task_id, task.layer_id, self.settings.layer_weight))
            self._attach(state, task.layer_id)
            return
        if DataSource.CHALLENGES in state.data.sources:
            self._curate(session_id, task)
        data = self._data(session_id, task)
        layer_id = self._train(session_id, task, data)
        self._decide(session_id, task, layer_id)

    # --- the data --------------------------------------------------------------------------

    def _data(self, session_id: str, task: PlanTask) -> TaskData:
        """The task's examples from each source, and its held-out set; recorded (with their digests) once."""
        state = self._state(session_id)
        system = self._system(state)
        trained: list[tuple[DataSource, Example]] = []
        held: list[tuple[DataSource, Example]] = []
        facts: list[distill.Fact] = []
        validation = ""
        sources = state.data.sources
        if DataSource.EXAMPLES in sources:
            assert state.data.training_file_id is not None
            trained += [(DataSource.EXAMPLES, e) for e in self._file(state, state.data.training_file_id)]
            if state.data.validation_file_id is not None:
                held += [(DataSource.EXAMPLES, e) for e in self._file(state, state.data.validation_file_id)]
                validation = "validation_file"
        taught, teacher_name = [], ""
        if DataSource.KNOWLEDGE in sources:
            texts = persona_texts(self.services, state.persona_id)
            facts = distill.facts(texts)
            if not facts:
                raise RuntimeError(f"persona {state.persona_id}'s knowledge holds no sentence to learn "
                                   "(add knowledge documents first)")
            trained += [(DataSource.KNOWLEDGE, e) for e in distill.training_examples(facts, system)]
            held += [(DataSource.KNOWLEDGE, e) for e in distill.heldout_examples(facts, system)]
            if (opened := self.teacher()) is not None:
                backend, teacher_name = opened
                taught = teacher.teach(backend, texts, cancelled=self._cancel_check(session_id))
                pairs, paraphrases = teacher.pair_examples(taught, system)
                trained += [(DataSource.KNOWLEDGE, e) for e in pairs]
                held += [(DataSource.KNOWLEDGE, e) for e in paraphrases]
            validation = validation or "heldout_form"
        if DataSource.CHALLENGES in sources:
            trained += [(DataSource.CHALLENGES, e) for e in self._examples(session_id, task.task_id)]
        if not trained:
            raise RuntimeError(f"no answer scored at least {self.settings.keep_score}: nothing to train on")
        if not held:
            held, trained, validation = _split(trained)
        examples, heldout = [e for _, e in trained], [e for _, e in held]
        if task.task_id not in state.prepared:
            sets = tuple(DataSet(source, data_sha256([e for s, e in trained if s is source]),
                                 sum(s is source for s, _ in trained), sum(s is source for s, _ in held))
                         for source in sources)
            self._execute(session_id, PrepareData(task.task_id, sets, validation, data_sha256(heldout), teacher_name,
                                                  len(taught)))
        return TaskData(examples, heldout, facts[: self.settings.scored_facts], system)

    def teacher(self) -> tuple[Backend, str] | None:
        """The configured teacher (`GENOME_ACADEMY_TEACHER_*`), opened on first use; None without one."""
        if self._teacher is False:
            self._teacher = teacher.open_teacher(self.services.settings, self.services.models)
        return self._teacher  # type: ignore[return-value]

    def _file(self, state: AcademySession, file_id: str) -> list[Example]:
        lines = file_dataset(self.services, state.owner, file_id).examples
        return [Example(tuple(ChatMessage(t.role, t.content) for t in line.messages)) for line in lines]

    def _system(self, state: AcademySession) -> str:
        if not state.persona_id:
            return DEFAULT_SYSTEM
        system, _ = self.stacks.persona(state.persona_id)
        return system.strip() or DEFAULT_SYSTEM

    def _curate(self, session_id: str, task: PlanTask) -> None:
        """Challenges, the persona's answers, the judge's scores and the kept examples, each once."""
        count = self.settings.challenges_per_task
        cancelled = self._cancel_check(session_id)
        for ordinal in range(count):
            self._check_cancelled(session_id)
            challenge_id = f"{task.task_id}-c{ordinal}"
            # The curriculum: the first third beginner, then intermediate, then advanced.
            difficulty = list(Difficulty)[min(2, 3 * ordinal // count)]
            state = self._state(session_id)
            challenge = state.challenge(challenge_id)
            if challenge is None:
                need = task.need or state.goal
                prompt = self._generate_challenge(need, task.trait_type, difficulty, ordinal, cancelled)
                self._execute(session_id, RecordChallenge(challenge_id, task.trait_type, difficulty, prompt,
                                                          (need,), task.task_id))
                challenge = self._state(session_id).challenge(challenge_id)
            assert challenge is not None
            if challenge.score is None:
                system, answer = self._answer(state.persona_id, challenge.prompt, cancelled)
                verdict = self._judge(challenge.prompt, challenge.criteria, answer, cancelled)
                self._execute(session_id, ScoreResponse(challenge_id, answer, verdict.score,
                                                        verdict.rationale, verdict.judge))
                challenge = self._state(session_id).challenge(challenge_id)
                assert challenge is not None and challenge.score is not None
                if challenge.score >= self.settings.keep_score:
                    messages = (ExampleMessage("system", system), ExampleMessage("user", challenge.prompt),
                                ExampleMessage("assistant", answer))
                    self._execute(session_id, KeepExample(challenge_id, messages))

    def _judge(self, prompt: str, criteria: Sequence[str], answer: str,
               cancelled: Callable[[], bool] = never_cancelled) -> Judgement:
        if self.settings.judge == "rubric":
            return rubric_score(prompt, criteria, answer, self.services.search.embedder.embed)
        return judge(self.backend, prompt, criteria, answer, retries=self.settings.judge_retries,
                     max_tokens=self.settings.judge_tokens, cancelled=cancelled)

    def _generate_challenge(self, goal: str, trait: TraitType, difficulty: Difficulty, ordinal: int,
                            cancelled: Callable[[], bool] = never_cancelled) -> str:
        ask = (
            f"Write one {difficulty.value} question or task (number {ordinal + 1}) that tests "
            f"{trait.value.replace('_', ' ')} for this goal: {goal}\nReply with the question only."
        )
        sampling = Sampling(temperature=0.8, max_tokens=self.settings.challenge_tokens, seed=ordinal)
        text = complete(self.backend, [ChatMessage("user", ask)], sampling, cancelled=cancelled).strip()
        # A model that says nothing still leaves a usable challenge: the goal itself, asked plainly.
        return text or f"{goal} (a {difficulty.value} exercise, number {ordinal + 1})"

    def _answer(self, persona_id: str, prompt: str,
                cancelled: Callable[[], bool] = never_cancelled) -> tuple[str, str]:
        """(system prompt, answer) from the persona as its genome stands now."""
        system, layers = self.stacks.persona(persona_id)
        system = system.strip() or DEFAULT_SYSTEM
        messages = [ChatMessage("system", system), ChatMessage("user", prompt)]
        sampling = Sampling(temperature=0.0, max_tokens=self.settings.answer_tokens)
        answer = complete(self.backend, messages, sampling, self.stacks.stack(layers), cancelled).strip()
        return system, answer or "I do not know."

    def _examples(self, session_id: str, task_id: str) -> list[Example]:
        """The task's kept examples (and those of challenges asked on demand, which serve the
        whole goal) from the events, easier curriculum levels first."""
        serves = {c.challenge_id for c in self._state(session_id).challenges if c.task_id in (task_id, None)}
        kept = [e.event for e in self.services.store.read_stream(session_id)
                if isinstance(e.event, ExampleKept) and e.event.challenge_id in serves]
        kept.sort(key=lambda example: example.level)
        return [Example(tuple(ChatMessage(m.role, m.content) for m in e.messages)) for e in kept]  # type: ignore[arg-type]

    # --- training and the layer -------------------------------------------------------------

    def _train(self, session_id: str, task: PlanTask, data: TaskData) -> str:
        state = self._state(session_id)
        examples = data.examples
        config = self._config(state, task, len(examples))
        steps = config.steps
        # The budget holds for the whole session: earlier tasks and runs cut short by a crash
        # count with what their last checkpoint recorded (steps after it run again, and count again).
        spent, started = state.training_seconds, time.monotonic()
        check_cancel = self._cancel_check(session_id)
        marks: dict[int, tuple[float, float]] = {}

        def seconds() -> float:
            return spent + time.monotonic() - started

        def cancelled() -> bool:
            if seconds() > state.budget_seconds:
                raise RuntimeError(f"the time budget of {state.budget_seconds:g} s ran out during training")
            return check_cancel()

        recorded = state.evaluation(task.task_id, 0, "before") is not None
        scores = () if recorded else self._scores(data, self._persona_layers(state), cancelled)

        def evaluated(evaluation: Evaluation) -> None:
            # The last step's evaluation waits for the layer: the task score is measured with it.
            if evaluation.step < steps:
                phase = "before" if evaluation.step == 0 else "checkpoint"
                self._record_evaluation(session_id, task, phase, evaluation, *(scores if phase == "before" else ()))

        def checkpointed(step: int, _: Path) -> None:
            # Recorded only now, with its checkpoint on disk: a recorded step never runs again.
            if step > self._state(session_id).last_step(task.task_id):
                loss, rate = marks[step]
                self._execute(session_id, RecordTrainingProgress(task.task_id, step, loss, rate, round(seconds(), 3)))

        # Trained where it runs: mlx-lm's tuner on an mlx backend, PEFT on torch otherwise.
        trainer = train_lora_mlx if self.backend.name == "mlx" else train_lora
        result = trainer(
            self.services.models.folder(self.model_name),
            examples,
            config,
            base_model=self.model_name,
            checkpoint_dir=self._checkpoints(session_id, task.task_id),
            checkpoint_every=self.settings.checkpoint_every,
            progress_every=1,
            on_progress=lambda p: marks.__setitem__(p.step, (p.loss, p.learning_rate)),
            on_checkpoint=checkpointed,
            cancelled=cancelled,
            validation=data.validation,
            on_evaluation=evaluated,
        )
        digest = data_sha256(examples)
        metrics = TrainingMetrics(loss=round(result.losses[-1], 6), epochs=None, steps=result.steps, tokens=result.tokens)
        details = LayerDetails(
            name=f"academy: {(task.need or state.goal)[:180]}",
            base_model=self.model_name,
            trait_type=task.trait_type,
            description=f"Trained by academy session {session_id} on {len(examples)} examples (data sha256 {digest}).",
            tags=["academy"],
            parent_layer_id=task.layer_id if task.action is TaskAction.REFINE else None,
        )
        # Keyed: a run resumed after registering finds the same layer instead of a twin.
        key = f"academy:{session_id}:{task.task_id}:layer"
        # Weights trained on a persona's knowledge carry it: they share that personal data's fate.
        personal = state.persona_id if DataSource.KNOWLEDGE in state.data.sources else None
        outcome = register_layer(self.services, state.owner, details, result.files,
                                 EventMetadata(actor="academy", idempotency_key=key), personal_of=personal)
        layer_id = outcome.aggregate.stream_id
        self.services.commands.execute(LAYER, layer_id, RecordTrainingMetrics(metrics))
        if task.task_id not in dict(self._state(session_id).finished_tasks):
            self._execute(session_id, RecordLayerProduced(task.task_id, layer_id, self.settings.layer_weight, digest,
                                                          metrics, details.parent_layer_id))
        final = result.evaluations[-1]
        if self._state(session_id).evaluation(task.task_id, steps, "after") is None:
            layers = [*self._persona_layers(state), (layer_id, self.settings.layer_weight)]
            after = self._scores(data, layers, cancelled)
            self._record_evaluation(session_id, task, "after", final, *after)
        return layer_id

    def _config(self, state: AcademySession, task: PlanTask, examples: int) -> TrainingConfig:
        """The trainer's settings: the runner's, with the session's hyperparameters and its share of the budget."""
        base, wanted = self.settings.training, state.data.hyperparameters
        batch = wanted.batch_size or base.batch_size
        steps = self._steps(state, task)
        if wanted.n_epochs is not None:
            steps = min(steps, max(1, math.ceil(wanted.n_epochs * examples / batch)))
        modules = self.settings.knowledge_modules if DataSource.KNOWLEDGE in state.data.sources else base.target_modules
        return msgspec.structs.replace(
            base, steps=steps, warmup_steps=min(base.warmup_steps, steps - 1), batch_size=batch, target_modules=modules,
            learning_rate=base.learning_rate * (wanted.learning_rate_multiplier or 1.0),
            seed=base.seed if state.data.seed is None else state.data.seed,
        )

    def _persona_layers(self, state: AcademySession) -> list[tuple[str, float]]:
        return list(self.stacks.persona(state.persona_id)[1]) if state.persona_id else []

    def _scores(self, data: TaskData, layers: Sequence[tuple[str, float]],
                cancelled: Callable[[], bool]) -> tuple[float, float] | tuple[()]:
        """(task score, held-out task score) with `layers`: greedy closed-book recall of the facts
        asked as trained and in the held-out form; () without facts."""
        if not data.facts:
            return ()
        stack = self.stacks.stack(layers)
        sampling = Sampling(temperature=0.0, max_tokens=self.settings.score_tokens)

        def recall(form: distill.ClozeForm) -> float:
            hits = 0
            for fact in data.facts:
                ask = form.ask.format(prompt=fact.prompt, answer="")
                messages = [ChatMessage("system", data.system), ChatMessage("user", ask)]
                hits += distill.recalled(complete(self.backend, messages, sampling, stack, cancelled), fact)
            return round(hits / len(data.facts), 6)

        return recall(distill.TRAINED_FORMS[0]), recall(distill.HELDOUT_FORM)

    def _record_evaluation(self, session_id: str, task: PlanTask, phase: str, evaluation: Evaluation,
                           task_score: float | None = None, heldout_task_score: float | None = None) -> None:
        if self._state(session_id).evaluation(task.task_id, evaluation.step, phase) is None:
            self._execute(session_id, RecordEvaluation(
                task.task_id, evaluation.step, phase, round(evaluation.loss, 6), round(evaluation.token_accuracy, 6),
                task_score, heldout_task_score))

    def _decide(self, session_id: str, task: PlanTask, layer_id: str) -> None:
        """Attach the layer if it improved the persona (or the session said to attach regardless);
        the decision and its reason are recorded either way, once."""
        state = self._state(session_id)
        decided = state.decision(task.task_id)
        if decided is None:
            attached, reason = self._verdict(state, task)
            self._execute(session_id, DecideAttach(task.task_id, layer_id, attached, reason))
            decided = self._state(session_id).decision(task.task_id)
            assert decided is not None
        if decided.attached:
            self._attach(state, layer_id)
        # The task is done for good: its checkpoints (weights and optimizer state) serve no resume now.
        checkpoints = self._checkpoints(session_id, task.task_id)
        if checkpoints.exists():
            shred(checkpoints)

    def _verdict(self, state: AcademySession, task: PlanTask) -> tuple[bool, str]:
        if not state.persona_id:
            return False, "no persona: the layer is registered for its base model and attached to none"
        if not state.data.attach_if_improved:
            return True, "attach_if_improved is off: attached without comparing"
        steps = state.last_step(task.task_id)
        before = state.evaluation(task.task_id, 0, "before")
        after = next((e for e in reversed(state.evaluations) if e.task_id == task.task_id and e.phase == "after"), None)
        if before is None or after is None:
            return False, f"no evaluation before and after training (step {steps}): not attached"
        margin = self.settings.attach_margin
        if before.task_score is not None and after.task_score is not None:
            gain = after.task_score - before.task_score
            verdict = "attached" if gain >= margin else "not attached"
            return gain >= margin, (f"{verdict}: the task score went from {before.task_score:.3f} to {after.task_score:.3f} "
                                    f"({gain:+.3f}; the margin is {margin:g})")
        drop = (before.valid_loss - after.valid_loss) / before.valid_loss if before.valid_loss > 0 else 0.0
        verdict = "attached" if drop >= margin else "not attached"
        return drop >= margin, (f"{verdict}: the held-out loss went from {before.valid_loss:.4f} to {after.valid_loss:.4f} "
                                f"({-drop:+.1%}; the margin is a {margin:.0%} drop)")

    @staticmethod
    def _steps(state: AcademySession, task: PlanTask) -> int:
        """The task's share of the session's step budget: the training tasks split it evenly."""
        training = [t.task_id for t in state.tasks or () if t.action is not TaskAction.USE]
        share, extra = divmod(state.budget_steps, len(training))
        return max(1, share + (training.index(task.task_id) < extra))

    def _checkpoints(self, session_id: str, task_id: str) -> Path:
        return self.services.settings.data_dir / "academy" / session_id / task_id

    def _attach(self, state: AcademySession, layer_id: str) -> None:
        genome = self.genomes.of_persona(state.persona_id)
        if genome is None:
            raise RuntimeError(f"persona {state.persona_id} has no genome to attach layer {layer_id} to")
        if any(ref.layer_id == layer_id for ref in genome.layers):
            return  # attached before a crash
        self.services.commands.execute(
            GENOME, genome.id, AttachLayer(LayerFacts(layer_id, self.model_name, deprecated=False),
                                           self.settings.layer_weight)
        )



def _split(examples: list[tuple[DataSource, Example]]) -> tuple[list, list, str]:
    """(held out, trained, how): every SPLIT_EVERY-th example set aside (the last one at least);
    a single example is both, and the record says it was not held out."""
    if len(examples) < 2:
        return list(examples), list(examples), "training_data"
    held = [i for i in range(len(examples)) if i % SPLIT_EVERY == SPLIT_EVERY - 1] or [len(examples) - 1]
    return [examples[i] for i in held], [e for i, e in enumerate(examples) if i not in held], "split"
