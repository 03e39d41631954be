"""Academy session: one attempt to train a new layer towards a goal, within a budget."""

from __future__ import annotations

import enum
import math
import re

import msgspec

from genome_service.domain.common import (
    Decider,
    DomainError,
    require,
    require_exists,
    require_new,
    require_text,
    require_weight,
)
from genome_service.domain.layer import TraitType, TrainingMetrics

STREAM_TYPE = "academy_session"
MAX_BUDGET_STEPS = 100_000
MAX_BUDGET_SECONDS = 86_400.0


class SessionStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED})
TRANSITIONS = {
    SessionStatus.PENDING: frozenset({SessionStatus.RUNNING, SessionStatus.CANCELLED, SessionStatus.FAILED}),
    # Back to pending: the worker crashed and the session is queued again.
    SessionStatus.RUNNING: frozenset(
        {SessionStatus.COMPLETED, SessionStatus.FAILED, SessionStatus.CANCELLED, SessionStatus.PENDING}
    ),
}


class TaskAction(enum.StrEnum):
    USE = "use"  # an existing layer is close enough: attach it as is
    REFINE = "refine"  # a layer is near: train a child of it
    TRAIN = "train"  # nothing is close: train from scratch


class Difficulty(enum.StrEnum):
    BEGINNER = "beginner"
    INTERMEDIATE = "intermediate"
    ADVANCED = "advanced"


# The curriculum level an example is tagged with: harder challenges come later in training.
LEVELS = {Difficulty.BEGINNER: 1, Difficulty.INTERMEDIATE: 2, Difficulty.ADVANCED: 3}
MAX_CHALLENGES = 1_000
MAX_TASKS = 16
MAX_NEEDS = 3  # a goal's sentences planned as tasks of their own; more would thin the budget out
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+|\n+")
SUFFIX_PATTERN = "^[a-z0-9][a-z0-9-]{0,39}$"
_SUFFIX = re.compile(SUFFIX_PATTERN)
MAX_EPOCHS = 100
MAX_BATCH_SIZE = 256
EVALUATION_PHASES = ("before", "checkpoint", "after")


class DataSource(enum.StrEnum):
    EXAMPLES = "examples"  # the user's chat JSONL (a training file)
    KNOWLEDGE = "knowledge"  # the persona's knowledge, as cloze items
    CHALLENGES = "challenges"  # the challenge / judge loop


class Hyperparameters(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """OpenAI's names: passes over the data, examples per step, a multiple of the academy's rate."""

    n_epochs: int | None = None
    batch_size: int | None = None
    learning_rate_multiplier: float | None = None


class TrainingData(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """What a session trains on and how its layer is judged and named."""

    sources: tuple[DataSource, ...] = (DataSource.CHALLENGES,)
    training_file_id: str | None = None
    validation_file_id: str | None = None
    hyperparameters: Hyperparameters = Hyperparameters()
    seed: int | None = None
    suffix: str = ""
    # Attach the layer to the persona only if the held-out evaluation says it improved.
    attach_if_improved: bool = True
    # A job on a base model rather than a persona: the model its layer is for ("" otherwise).
    base_model: str = ""


class DataSet(msgspec.Struct, frozen=True, gc=False):
    source: DataSource
    sha256: str  # of the examples trained on, as the trainer encodes them
    examples: int
    heldout: int  # examples of the validation set that came from this source


class PlanTask(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    trait_type: TraitType
    action: TaskAction
    layer_id: str | None = None  # the layer used or refined
    similarity: float | None = None  # of that layer to the need
    need: str = ""  # the part of the goal this task serves; empty: the whole goal


class ExampleMessage(msgspec.Struct, frozen=True, gc=False):
    role: str  # system, user or assistant
    content: str


def goal_needs(goal: str, limit: int = MAX_NEEDS) -> list[str]:
    """The goal's needs: its sentences (or lines), the first `limit` distinct ones; the rest of
    the goal goes with the last, so no part of it is dropped."""
    parts: list[str] = []
    for part in (p.strip() for p in _SENTENCE_END.split(goal)):
        if part and part.lower() not in {p.lower() for p in parts}:
            parts.append(part)
    if len(parts) > limit >= 1:
        parts[limit - 1:] = [" ".join(parts[limit - 1:])]
    return parts or [goal.strip()]


# Events
class AcademySessionStarted(msgspec.Struct, frozen=True, gc=False, tag=True):
    session_id: str
    owner: str
    persona_id: str
    goal: str
    target_similarity: float
    budget_steps: int
    budget_seconds: float
    needs: tuple[str, ...] = ()  # planned as given; empty: the goal's own sentences
    data: TrainingData = TrainingData()


class SessionStatusChanged(msgspec.Struct, frozen=True, gc=False, tag=True):
    status: SessionStatus
    reason: str = ""


class PlanMade(msgspec.Struct, frozen=True, gc=False, tag=True):
    tasks: tuple[PlanTask, ...]


class ChallengeGenerated(msgspec.Struct, frozen=True, gc=False, tag=True):
    challenge_id: str
    trait_type: TraitType
    difficulty: Difficulty
    prompt: str
    criteria: tuple[str, ...] = ()
    task_id: str | None = None


class ResponseScored(msgspec.Struct, frozen=True, gc=False, tag=True):
    challenge_id: str
    response: str
    score: float  # 0..100
    rationale: str
    judge: str  # "model", "heuristic", "rubric" or "client"


class ExampleKept(msgspec.Struct, frozen=True, gc=False, tag=True):
    challenge_id: str
    messages: tuple[ExampleMessage, ...]
    level: int


class TrainingProgressed(msgspec.Struct, frozen=True, gc=False, tag=True):
    """Steps up to `step` are done and checkpointed: a resumed run starts after it."""

    task_id: str
    step: int
    loss: float
    learning_rate: float
    # The session's training time so far, every task and every run before a resume included:
    # what the time budget is held against.
    seconds: float = 0.0


class LayerProduced(msgspec.Struct, frozen=True, gc=False, tag=True):
    task_id: str
    layer_id: str
    weight: float
    data_sha256: str
    metrics: TrainingMetrics
    parent_layer_id: str | None = None


class LayerReused(msgspec.Struct, frozen=True, gc=False, tag=True):
    task_id: str
    layer_id: str
    weight: float


class DataPrepared(msgspec.Struct, frozen=True, gc=False, tag=True):
    """The task's training data, by source, and where its held-out set came from."""

    task_id: str
    sets: tuple[DataSet, ...]
    # "validation_file", "heldout_form" (knowledge asked another way), "split" (examples set
    # aside) or "training_data" (too few examples to set any aside: not held out).
    validation: str
    validation_sha256: str
    teacher: str = ""  # the teacher model that wrote question/answer pairs (`backend:model`), if one did
    teacher_pairs: int = 0


class Evaluated(msgspec.Struct, frozen=True, gc=False, tag=True, omit_defaults=True):
    """The adapter on held-out data after `step` steps (0: before training)."""

    task_id: str
    step: int
    phase: str  # before, checkpoint or after
    valid_loss: float
    valid_token_accuracy: float
    # Knowledge: the fraction of facts whose answer a greedy closed-book answer names, asked as
    # trained (task_score) and in the held-out form; measured before and after only.
    task_score: float | None = None
    heldout_task_score: float | None = None


class AttachDecided(msgspec.Struct, frozen=True, gc=False, tag=True):
    task_id: str
    layer_id: str
    attached: bool
    reason: str


AcademyEvent = (
    AcademySessionStarted
    | SessionStatusChanged
    | PlanMade
    | ChallengeGenerated
    | ResponseScored
    | ExampleKept
    | TrainingProgressed
    | LayerProduced
    | LayerReused
    | DataPrepared
    | Evaluated
    | AttachDecided
)


class Challenge(msgspec.Struct, frozen=True, gc=False):
    challenge_id: str
    trait_type: TraitType
    difficulty: Difficulty
    prompt: str
    criteria: tuple[str, ...]
    task_id: str | None
    score: float | None = None
    kept: bool = False


# State
class AcademySession(msgspec.Struct, frozen=True, gc=False):
    session_id: str
    owner: str
    persona_id: str
    goal: str
    target_similarity: float
    budget_steps: int
    budget_seconds: float
    needs: tuple[str, ...] = ()
    status: SessionStatus = SessionStatus.PENDING
    reason: str = ""
    tasks: tuple[PlanTask, ...] | None = None  # None until planned
    challenges: tuple[Challenge, ...] = ()
    examples: int = 0
    trained_steps: tuple[tuple[str, int], ...] = ()  # (task id, last checkpointed step)
    loss: float | None = None  # the latest training loss
    training_seconds: float = 0.0  # spent on training, as of the latest checkpoint
    # Answer tokens the produced layers were trained on; None once a layer's metrics did not
    # say (recorded before layers counted them): an unknown sum is not a small one.
    trained_tokens: int | None = 0
    finished_tasks: tuple[tuple[str, str], ...] = ()  # (task id, layer id) produced or reused
    data: TrainingData = TrainingData()
    prepared: tuple[str, ...] = ()  # tasks whose data is recorded
    evaluations: tuple[Evaluated, ...] = ()
    decisions: tuple[AttachDecided, ...] = ()

    def challenge(self, challenge_id: str) -> Challenge | None:
        return next((c for c in self.challenges if c.challenge_id == challenge_id), None)

    def task(self, task_id: str) -> PlanTask | None:
        return next((t for t in self.tasks or () if t.task_id == task_id), None)

    def last_step(self, task_id: str) -> int:
        return dict(self.trained_steps).get(task_id, 0)

    def evaluation(self, task_id: str, step: int, phase: str) -> Evaluated | None:
        return next((e for e in self.evaluations if (e.task_id, e.step, e.phase) == (task_id, step, phase)), None)

    def decision(self, task_id: str) -> AttachDecided | None:
        return next((d for d in self.decisions if d.task_id == task_id), None)


# Commands
class StartAcademySession(msgspec.Struct, frozen=True, gc=False):
    session_id: str
    owner: str
    persona_id: str
    goal: str
    target_similarity: float = 0.95
    budget_steps: int = 100
    budget_seconds: float = 3600.0
    needs: tuple[str, ...] = ()
    data: TrainingData = TrainingData()


class ChangeSessionStatus(msgspec.Struct, frozen=True, gc=False):
    status: SessionStatus
    reason: str = ""


class MakePlan(msgspec.Struct, frozen=True, gc=False):
    tasks: tuple[PlanTask, ...]


class RecordChallenge(msgspec.Struct, frozen=True, gc=False):
    challenge_id: str
    trait_type: TraitType
    difficulty: Difficulty
    prompt: str
    criteria: tuple[str, ...] = ()
    task_id: str | None = None


class ScoreResponse(msgspec.Struct, frozen=True, gc=False):
    challenge_id: str
    response: str
    score: float
    rationale: str
    judge: str


class KeepExample(msgspec.Struct, frozen=True, gc=False):
    challenge_id: str
    messages: tuple[ExampleMessage, ...]


class RecordTrainingProgress(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    step: int
    loss: float
    learning_rate: float
    seconds: float = 0.0


class RecordLayerProduced(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    layer_id: str
    weight: float
    data_sha256: str
    metrics: TrainingMetrics
    parent_layer_id: str | None = None


class RecordLayerReused(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    layer_id: str
    weight: float


class PrepareData(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    sets: tuple[DataSet, ...]
    validation: str
    validation_sha256: str
    teacher: str = ""
    teacher_pairs: int = 0


class RecordEvaluation(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    step: int
    phase: str
    valid_loss: float
    valid_token_accuracy: float
    task_score: float | None = None
    heldout_task_score: float | None = None


class DecideAttach(msgspec.Struct, frozen=True, gc=False):
    task_id: str
    layer_id: str
    attached: bool
    reason: str


AcademyCommand = (
    StartAcademySession
    | ChangeSessionStatus
    | MakePlan
    | RecordChallenge
    | ScoreResponse
    | KeepExample
    | RecordTrainingProgress
    | RecordLayerProduced
    | RecordLayerReused
    | PrepareData
    | RecordEvaluation
    | DecideAttach
)
JUDGES = ("model", "heuristic", "client", "rubric")
ROLES = ("system", "user", "assistant")


def decide(command: AcademyCommand, state: AcademySession | None) -> list[AcademyEvent]:
    if isinstance(command, StartAcademySession):
        require_new(state, "academy_session")
        _require_plan(command)
        return [AcademySessionStarted(**msgspec.structs.asdict(command))]
    require_exists(state, "academy_session")
    assert state is not None
    match command:
        case ChangeSessionStatus(status=status, reason=reason):
            # Repeating a live status is a no-op (a worker re-claiming its session); a finished
            # session refuses everything, its own status included: two cancels decided on the
            # same version cannot both pass, and a second cancel is a mistake worth saying.
            if status == state.status and status not in TERMINAL:
                return []
            require(
                state.status not in TERMINAL,
                "session_finished",
                f"session {state.session_id} is {state.status.value} and can no longer change",
            )
            require(
                status in TRANSITIONS[state.status],
                "status_transition_not_allowed",
                f"session {state.session_id} cannot go from {state.status.value} to {status.value}",
            )
            return [SessionStatusChanged(status, reason)]
    require(
        state.status not in TERMINAL,
        "session_finished",
        f"session {state.session_id} is {state.status.value} and can no longer change",
    )
    match command:
        case MakePlan(tasks=tasks):
            require(state.tasks is None, "plan_exists", f"session {state.session_id} already has a plan")
            _require_tasks(tasks)
            return [PlanMade(tasks)]
        case RecordChallenge():
            return [_challenge(command, state)]
        case ScoreResponse():
            return [_scored(command, state)]
        case KeepExample(challenge_id=challenge_id, messages=messages):
            return [_kept(challenge_id, messages, state)]
        case RecordTrainingProgress(task_id=task_id, step=step, loss=loss, learning_rate=rate, seconds=seconds):
            _require_training_task(task_id, state)
            last = state.last_step(task_id)
            # A step recorded is a step checkpointed; recording it again means it ran twice.
            require(
                step > last,
                "training_step_not_after_last",
                f"task {task_id}: step {step} must come after the last recorded step {last}",
            )
            require(
                math.isfinite(loss) and loss >= 0 and math.isfinite(rate) and rate >= 0,
                "training_progress_not_finite",
                f"task {task_id}: loss and learning rate must be finite and non-negative (got {loss}, {rate})",
            )
            require(
                math.isfinite(seconds) and seconds >= state.training_seconds,
                "training_seconds_not_after_last",
                f"task {task_id}: training seconds must be finite and at least the {state.training_seconds:g} "
                f"already spent (got {seconds})",
            )
            return [TrainingProgressed(task_id, step, loss, rate, seconds)]
        case RecordLayerProduced():
            _require_training_task(command.task_id, state)
            _require_task_open(command.task_id, state)
            require_weight(command.weight)
            return [LayerProduced(**msgspec.structs.asdict(command))]
        case RecordLayerReused(task_id=task_id, layer_id=layer_id, weight=weight):
            task = state.task(task_id)
            require(
                task is not None and task.action is TaskAction.USE and task.layer_id == layer_id,
                "task_not_reuse",
                f"task {task_id} is not a plan to use layer {layer_id} as is",
            )
            _require_task_open(task_id, state)
            require_weight(weight)
            return [LayerReused(task_id, layer_id, weight)]
        case PrepareData(task_id=task_id):
            _require_training_task(task_id, state)
            require(task_id not in state.prepared, "data_exists", f"task {task_id} already has its data")
            return [DataPrepared(**msgspec.structs.asdict(command))]
        case RecordEvaluation():
            return [_evaluated(command, state)]
        case DecideAttach(task_id=task_id, layer_id=layer_id):
            require(dict(state.finished_tasks).get(task_id) == layer_id, "task_layer_mismatch",
                    f"task {task_id} did not produce layer {layer_id}")
            require(state.decision(task_id) is None, "attach_decision_exists", f"task {task_id}'s layer is decided")
            require_text(command.reason, "reason", max_length=2000)
            return [AttachDecided(**msgspec.structs.asdict(command))]
    raise DomainError("unknown_command", f"academy session cannot handle {type(command).__name__}")


def _require_plan(command: StartAcademySession) -> None:
    require_text(command.goal, "goal", max_length=2000)
    similarity, steps, seconds = command.target_similarity, command.budget_steps, command.budget_seconds
    require(
        math.isfinite(similarity) and 0.0 < similarity <= 1.0,
        "target_similarity_out_of_range",
        f"target_similarity must be a finite number in (0, 1] (got {similarity})",
    )
    require(
        1 <= steps <= MAX_BUDGET_STEPS,
        "budget_steps_out_of_range",
        f"budget_steps must be in 1..{MAX_BUDGET_STEPS} (got {steps})",
    )
    require(
        math.isfinite(seconds) and 0.0 < seconds <= MAX_BUDGET_SECONDS,
        "budget_seconds_out_of_range",
        f"budget_seconds must be a finite number in (0, {MAX_BUDGET_SECONDS:g}] (got {seconds})",
    )
    require(len(command.needs) <= MAX_TASKS, "needs_out_of_range", f"a session has at most {MAX_TASKS} needs")
    for need in command.needs:
        require_text(need, "need", max_length=2000)
    _require_data(command.data, command.persona_id)


def _require_data(data: TrainingData, persona_id: str) -> None:
    sources = data.sources
    require(bool(sources) and len(set(sources)) == len(sources), "sources_invalid",
            f"name each training data source once, at least one (got {[s.value for s in sources]})")
    require((DataSource.EXAMPLES in sources) == (data.training_file_id is not None), "training_file_mismatch",
            "a session trains on a training file exactly when its sources include examples")
    require(data.validation_file_id is None or data.training_file_id is not None, "validation_file_without_training_file",
            "a validation file goes with a training file")
    if not persona_id:
        require(bool(data.base_model) and sources == (DataSource.EXAMPLES,), "persona_required",
                "without a persona a session needs a base model and trains on a training file only")
    epochs, batch, multiplier = (data.hyperparameters.n_epochs, data.hyperparameters.batch_size,
                                 data.hyperparameters.learning_rate_multiplier)
    require(epochs is None or 1 <= epochs <= MAX_EPOCHS, "n_epochs_out_of_range", f"n_epochs must be in 1..{MAX_EPOCHS}")
    require(batch is None or 1 <= batch <= MAX_BATCH_SIZE, "batch_size_out_of_range",
            f"batch_size must be in 1..{MAX_BATCH_SIZE}")
    require(multiplier is None or (math.isfinite(multiplier) and 0 < multiplier <= 100), "learning_rate_multiplier_out_of_range",
            "learning_rate_multiplier must be a finite number in (0, 100]")
    require(data.seed is None or 0 <= data.seed < 2**31, "seed_out_of_range", "seed must be within 0..2147483647")
    require(not data.suffix or _SUFFIX.fullmatch(data.suffix) is not None, "suffix_invalid",
            "a suffix is 1..40 lowercase letters, digits and dashes, starting with a letter or digit")


def _evaluated(command: RecordEvaluation, state: AcademySession) -> Evaluated:
    _require_training_task(command.task_id, state)
    require(command.phase in EVALUATION_PHASES, "evaluation_phase_unknown",
            f"phase must be one of {', '.join(EVALUATION_PHASES)} (got {command.phase!r})")
    require(state.evaluation(command.task_id, command.step, command.phase) is None, "evaluation_exists",
            f"task {command.task_id} is already evaluated at step {command.step} ({command.phase})")
    values = (command.valid_loss, command.valid_token_accuracy, command.task_score, command.heldout_task_score)
    require(all(v is None or (math.isfinite(v) and v >= 0) for v in values)
            and all(v is None or v <= 1 for v in values[1:]), "evaluation_out_of_range",
            "a loss is finite and non-negative; accuracies and scores are within 0..1")
    return Evaluated(**msgspec.structs.asdict(command))


def _require_tasks(tasks: tuple[PlanTask, ...]) -> None:
    require(0 < len(tasks) <= MAX_TASKS, "plan_size_out_of_range", f"a plan has 1..{MAX_TASKS} tasks (got {len(tasks)})")
    ids = [task.task_id for task in tasks]
    require(len(set(ids)) == len(ids), "task_id_repeated", f"task ids must be unique (got {ids})")
    for task in tasks:
        require(len(task.need) <= 2000, "need_too_long", f"task {task.task_id}: a need is at most 2000 characters")
        needs_layer = task.action is not TaskAction.TRAIN
        require(
            (task.layer_id is not None) == needs_layer,
            "task_layer_mismatch",
            f"task {task.task_id}: {task.action.value} {'needs' if needs_layer else 'takes no'} layer_id",
        )


def _challenge(command: RecordChallenge, state: AcademySession) -> ChallengeGenerated:
    require(
        state.challenge(command.challenge_id) is None,
        "challenge_exists",
        f"challenge {command.challenge_id} already exists in session {state.session_id}",
    )
    require(
        len(state.challenges) < MAX_CHALLENGES,
        "too_many_challenges",
        f"a session holds at most {MAX_CHALLENGES} challenges",
    )
    require_text(command.prompt, "prompt", max_length=10_000)
    if command.task_id is not None:
        require(state.task(command.task_id) is not None, "task_not_found", f"no task {command.task_id} in the plan")
    return ChallengeGenerated(**msgspec.structs.asdict(command))


def _scored(command: ScoreResponse, state: AcademySession) -> ResponseScored:
    challenge = state.challenge(command.challenge_id)
    require(challenge is not None, "challenge_not_found", f"no challenge {command.challenge_id} in this session")
    assert challenge is not None
    require(challenge.score is None, "response_exists", f"challenge {command.challenge_id} is already scored")
    require(
        math.isfinite(command.score) and 0.0 <= command.score <= 100.0,
        "score_out_of_range",
        f"score must be a finite number in [0, 100] (got {command.score})",
    )
    require_text(command.response, "response", max_length=20_000)
    require_text(command.rationale, "rationale", max_length=4_000)
    require(command.judge in JUDGES, "judge_unknown", f"judge must be one of {', '.join(JUDGES)} (got {command.judge!r})")
    return ResponseScored(**msgspec.structs.asdict(command))


def _kept(challenge_id: str, messages: tuple[ExampleMessage, ...], state: AcademySession) -> ExampleKept:
    challenge = state.challenge(challenge_id)
    require(
        challenge is not None and challenge.score is not None,
        "challenge_not_scored",
        f"challenge {challenge_id} must exist and be scored before its example is kept",
    )
    assert challenge is not None
    require(not challenge.kept, "example_exists", f"the example of challenge {challenge_id} is already kept")
    roles = tuple(message.role for message in messages)
    require(
        len(roles) >= 2 and roles[-1] == "assistant" and set(roles) <= set(ROLES),
        "example_malformed",
        f"an example is system/user/assistant messages ending with the assistant's (got roles {list(roles)})",
    )
    return ExampleKept(challenge_id, messages, LEVELS[challenge.difficulty])


def _require_training_task(task_id: str, state: AcademySession) -> None:
    task = state.task(task_id)
    require(
        task is not None and task.action is not TaskAction.USE,
        "task_not_training",
        f"task {task_id} is not a training task of session {state.session_id}",
    )


def _require_task_open(task_id: str, state: AcademySession) -> None:
    require(
        task_id not in dict(state.finished_tasks),
        "task_finished",
        f"task {task_id} of session {state.session_id} already has its layer",
    )


def evolve(state: AcademySession | None, event: AcademyEvent) -> AcademySession:
    match event:
        case AcademySessionStarted():
            return AcademySession(**msgspec.structs.asdict(event))
    assert state is not None, f"{type(event).__name__} before AcademySessionStarted"
    match event:
        case SessionStatusChanged(status=status, reason=reason):
            return msgspec.structs.replace(state, status=status, reason=reason)
        case PlanMade(tasks=tasks):
            return msgspec.structs.replace(state, tasks=tasks)
        case ChallengeGenerated():
            fields = msgspec.structs.asdict(event)
            return msgspec.structs.replace(state, challenges=(*state.challenges, Challenge(**fields)))
        case ResponseScored(challenge_id=challenge_id, score=score):
            return _with_challenge(state, challenge_id, score=score)
        case ExampleKept(challenge_id=challenge_id):
            state = _with_challenge(state, challenge_id, kept=True)
            return msgspec.structs.replace(state, examples=state.examples + 1)
        case TrainingProgressed(task_id=task_id, step=step, loss=loss, seconds=seconds):
            steps = {**dict(state.trained_steps), task_id: step}
            return msgspec.structs.replace(state, trained_steps=tuple(steps.items()), loss=loss,
                                           training_seconds=max(seconds, state.training_seconds))
        case LayerProduced(task_id=task_id, layer_id=layer_id, metrics=metrics):
            tokens = None if state.trained_tokens is None or metrics.tokens is None else state.trained_tokens + metrics.tokens
            return msgspec.structs.replace(state, finished_tasks=(*state.finished_tasks, (task_id, layer_id)),
                                           trained_tokens=tokens)
        case LayerReused(task_id=task_id, layer_id=layer_id):
            return msgspec.structs.replace(state, finished_tasks=(*state.finished_tasks, (task_id, layer_id)))
        case DataPrepared(task_id=task_id):
            return msgspec.structs.replace(state, prepared=(*state.prepared, task_id))
        case Evaluated():
            return msgspec.structs.replace(state, evaluations=(*state.evaluations, event))
        case AttachDecided():
            return msgspec.structs.replace(state, decisions=(*state.decisions, event))
    raise TypeError(f"unknown academy session event {type(event).__name__}")


def _with_challenge(state: AcademySession, challenge_id: str, **changes: object) -> AcademySession:
    challenges = tuple(
        msgspec.structs.replace(c, **changes) if c.challenge_id == challenge_id else c for c in state.challenges
    )
    return msgspec.structs.replace(state, challenges=challenges)


ACADEMY_SESSION = Decider(
    stream_type=STREAM_TYPE,
    event_type=AcademyEvent,
    state_type=AcademySession,
    decide=decide,
    evolve=evolve,
)
