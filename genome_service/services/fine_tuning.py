"""OpenAI's fine-tuning jobs as a second front door to academy sessions.

A job is an academy session that trains on a training file (and is evaluated on its
validation file, or on examples set aside from it). `model` names a base model (the job
registers a layer for it) or one of the caller's personas (the layer is also attached to
it, under the session's attach-if-improved rule). A succeeded job's `fine_tuned_model` is
``ft:<base>:<suffix>:<layer id>``: the base model plus that one layer, usable in
`/v1/chat/completions`. Job events and checkpoints are read off the session's events.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa

from genome_service.domain.academy import (
    ACADEMY_SESSION,
    MAX_BUDGET_SECONDS,
    AcademySession,
    AttachDecided,
    DataSource,
    Evaluated,
    Hyperparameters,
    LayerProduced,
    SessionStatus,
    SessionStatusChanged,
    StartAcademySession,
    TrainingData,
    TrainingProgressed,
)
from genome_service.eventstore.records import RecordedEvent
from genome_service.projections.tables import ACADEMY_SESSIONS
from genome_service.services.academy_sessions import AcademySessions, require_files, start_session
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.errors import NotFound
from genome_service.services.genomes import Genomes
from genome_service.services.layers import Layers
from genome_service.services.personas import Personas
from genome_service.services.training_files import TrainingFiles
from inference.models import UnknownModel

FT_PREFIX = "ft:"
DEFAULT_EPOCHS = 3
JOB_BUDGET_STEPS = 10_000  # the epochs decide; this only bounds a job asked for too many
MAX_JOBS_LISTED = 1_000
STATUSES = {
    SessionStatus.PENDING: "queued", SessionStatus.RUNNING: "running", SessionStatus.COMPLETED: "succeeded",
    SessionStatus.FAILED: "failed", SessionStatus.CANCELLED: "cancelled",
}


class JobError(msgspec.Struct, frozen=True):
    code: str
    message: str
    param: str | None = None


class JobHyperparameters(msgspec.Struct, frozen=True):
    n_epochs: int
    batch_size: int | None
    learning_rate_multiplier: float


class FineTuningJob(msgspec.Struct, frozen=True):
    id: str
    object: str
    created_at: int
    finished_at: int | None
    model: str
    fine_tuned_model: str | None
    organization_id: str
    status: str
    hyperparameters: JobHyperparameters
    training_file: str
    validation_file: str | None
    result_files: list[str]
    trained_tokens: int | None
    error: JobError | None
    seed: int
    suffix: str | None
    # Not OpenAI's: the persona the layer is for, the layer, and whether it was attached and why.
    persona_id: str | None
    layer_id: str | None
    attached: bool | None
    attach_reason: str | None


class JobEvent(msgspec.Struct, frozen=True):
    id: str
    object: str
    created_at: int
    level: str
    message: str
    type: str
    data: dict[str, Any] | None


class JobCheckpoint(msgspec.Struct, frozen=True):
    id: str
    object: str
    created_at: int
    fine_tuning_job_id: str
    fine_tuned_model_checkpoint: str
    step_number: int
    metrics: dict[str, float]


class ListPage(msgspec.Struct, frozen=True):
    object: str
    data: list[Any]
    has_more: bool


def fine_tuned_model(base_model: str, suffix: str, layer_id: str) -> str:
    return f"{FT_PREFIX}{base_model}:{suffix}:{layer_id}"


def layer_of_model(model: str) -> str | None:
    """The layer id an ``ft:`` model name ends with; None for any other name."""
    if not model.startswith(FT_PREFIX) or model.count(":") < 3:
        return None
    return model.rsplit(":", 1)[1] or None


def _seconds(moment: datetime) -> int:
    return int(moment.timestamp())


def _paged(items: list[Any], after: str | None, limit: int) -> ListPage:
    if after is not None:
        ids = [item.id for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    return ListPage("list", items[:limit], len(items) > limit)


class FineTuning:
    def __init__(self, services: Services) -> None:
        self.services = services
        self.sessions = AcademySessions(services)

    # Commands
    def create(
        self, command: Command, *, model: str, training_file: str, validation_file: str | None = None,
        suffix: str | None = None, seed: int | None = None, hyperparameters: Hyperparameters | None = None,
    ) -> FineTuningJob:
        """A queued job training `model` (a base model or one of the caller's personas) on the caller's file."""
        files = TrainingFiles(self.services)
        training = files.get(command.caller, training_file)
        if validation_file is not None:
            files.get(command.caller, validation_file)
        hyperparameters = hyperparameters or Hyperparameters()
        wanted = msgspec.structs.replace(hyperparameters, n_epochs=hyperparameters.n_epochs or DEFAULT_EPOCHS)
        base = self._base_model(model)
        data = TrainingData(
            sources=(DataSource.EXAMPLES,), training_file_id=training_file, validation_file_id=validation_file,
            hyperparameters=wanted, seed=seed, suffix=suffix or "", base_model=base or "",
        )
        goal = f"Fine-tune on {training.filename} ({training.examples} examples)."
        if base is None:
            persona_id = Personas(self.services).resolve_model(command.caller, model)
            session_id = start_session(self.services, persona_id, goal, owner=command.owner, budget_steps=JOB_BUDGET_STEPS,
                                       budget_seconds=MAX_BUDGET_SECONDS, metadata=command.metadata, data=data)
        else:
            require_files(self.services, command.owner, data)

            def start(session_id: str) -> StartAcademySession:
                return StartAcademySession(session_id, command.owner, "", goal, budget_steps=JOB_BUDGET_STEPS,
                                           budget_seconds=MAX_BUDGET_SECONDS, data=data)

            ACADEMY_SESSION.decide(start("validation"), None)
            session_id = create_stream(self.services, ACADEMY_SESSION, command.metadata, start).aggregate.stream_id
        return self.get(command.caller, session_id)

    def cancel(self, command: Command, job_id: str) -> FineTuningJob:
        self._job_state(command.caller, job_id)
        self.sessions.cancel(command, job_id)
        return self.get(command.caller, job_id)

    def _base_model(self, model: str) -> str | None:
        """`model` if it names a base model; None if it may name a persona."""
        try:
            return self.services.models.get(model).name
        except UnknownModel:
            return None

    # Reads
    def get(self, caller: Caller, job_id: str) -> FineTuningJob:
        state = self._job_state(caller, job_id)
        row = self.sessions.visible(caller, job_id)
        return self._job(state, row["created_at"], row["updated_at"])

    def list(self, caller: Caller, *, after: str | None = None, limit: int = 20) -> ListPage:
        """The caller's jobs, newest first."""
        query = (sa.select(ACADEMY_SESSIONS.c.session_id, ACADEMY_SESSIONS.c.created_at, ACADEMY_SESSIONS.c.updated_at)
                 .where(ACADEMY_SESSIONS.c.owner == caller.owner)
                 .order_by(ACADEMY_SESSIONS.c.created_at.desc(), ACADEMY_SESSIONS.c.session_id.desc())
                 .limit(MAX_JOBS_LISTED))
        with self.services.database.read() as connection:
            rows = connection.execute(query).all()
        jobs = []
        for session_id, created_at, updated_at in rows:
            state = self.services.repository.load(ACADEMY_SESSION, session_id).state
            if state is not None and state.data.training_file_id is not None:
                jobs.append(self._job(state, created_at, updated_at))
        return _paged(jobs, after, limit)

    def events(self, caller: Caller, job_id: str, *, after: str | None = None, limit: int = 20) -> ListPage:
        """The job's events, newest first: status changes, training and validation metrics, the layer."""
        self._job_state(caller, job_id)
        found = [e for recorded in self.services.store.read_stream(job_id) for e in _job_events(job_id, recorded)]
        return _paged(found[::-1], after, limit)

    def checkpoints(self, caller: Caller, job_id: str, *, after: str | None = None, limit: int = 10) -> ListPage:
        """One per recorded training checkpoint, newest first, with its step's training and validation metrics."""
        self._job_state(caller, job_id)
        recorded = list(self.services.store.read_stream(job_id))
        evaluations = {e.event.step: e.event for e in recorded if isinstance(e.event, Evaluated)}
        found = []
        for entry in recorded:
            event = entry.event
            if not isinstance(event, TrainingProgressed):
                continue
            metrics = {"step": float(event.step), "train_loss": event.loss}
            if (evaluation := evaluations.get(event.step)) is not None:
                metrics |= {"valid_loss": evaluation.valid_loss, "valid_mean_token_accuracy": evaluation.valid_token_accuracy}
            found.append(JobCheckpoint(
                id=f"ftckpt-{job_id}-{event.step}", object="fine_tuning.job.checkpoint",
                created_at=_seconds(entry.recorded_at), fine_tuning_job_id=job_id,
                fine_tuned_model_checkpoint=f"{job_id}:step-{event.step}", step_number=event.step, metrics=metrics,
            ))
        return _paged(found[::-1], after, limit)

    def models(self, caller: Caller) -> list[tuple[str, int]]:
        """(fine-tuned model name, created) of the caller's succeeded jobs whose layer is live."""
        return [(job.fine_tuned_model, job.finished_at or job.created_at) for job in self.list(caller, limit=MAX_JOBS_LISTED).data
                if job.fine_tuned_model is not None]

    def layer_for_model(self, caller: Caller, model: str) -> tuple[str, str] | None:
        """(base model, layer id) of an ``ft:`` model the caller may chat with; None if `model` is not one."""
        layer_id = layer_of_model(model)
        if layer_id is None:
            return None
        row = Layers(self.services).readable(caller, layer_id)
        if row["erased"] or fine_tuned_model(row["base_model"], model.split(":")[-2], layer_id) != model:
            raise NotFound("model", model)
        return row["base_model"], layer_id

    def _job_state(self, caller: Caller, job_id: str) -> AcademySession:
        try:
            self.sessions.visible(caller, job_id)
        except NotFound:
            raise NotFound("fine_tuning_job", job_id) from None
        state = self.services.repository.load(ACADEMY_SESSION, job_id).state
        if state is None or state.data.training_file_id is None:
            raise NotFound("fine_tuning_job", job_id)
        return state

    def _job(self, state: AcademySession, created_at: datetime, updated_at: datetime) -> FineTuningJob:
        data, status = state.data, STATUSES[state.status]
        layer_id = next((layer for _, layer in state.finished_tasks), None)
        decision = state.decisions[-1] if state.decisions else None
        base = data.base_model or self._persona_model(state.persona_id)
        done = status in ("succeeded", "failed", "cancelled")
        wanted = data.hyperparameters
        return FineTuningJob(
            id=state.session_id, object="fine_tuning.job", created_at=_seconds(created_at),
            finished_at=_seconds(updated_at) if done else None,
            model=base if not state.persona_id else state.persona_id,
            fine_tuned_model=fine_tuned_model(base, data.suffix, layer_id) if status == "succeeded" and layer_id else None,
            organization_id=state.owner, status=status,
            hyperparameters=JobHyperparameters(wanted.n_epochs or DEFAULT_EPOCHS, wanted.batch_size,
                                               wanted.learning_rate_multiplier or 1.0),
            training_file=data.training_file_id or "", validation_file=data.validation_file_id, result_files=[],
            trained_tokens=state.trained_tokens if status == "succeeded" else None,
            error=JobError(status, state.reason) if status == "failed" else None,
            seed=data.seed or 0, suffix=data.suffix or None, persona_id=state.persona_id or None, layer_id=layer_id,
            attached=decision.attached if decision else None, attach_reason=decision.reason if decision else None,
        )

    def _persona_model(self, persona_id: str) -> str:
        genome = Genomes(self.services).of_persona(persona_id)
        return genome.base_model if genome is not None else self.services.settings.inference_model


def _job_events(job_id: str, recorded: RecordedEvent) -> Iterable[JobEvent]:
    event, created = recorded.event, _seconds(recorded.recorded_at)

    def one(message: str, kind: str = "message", data: dict[str, Any] | None = None, level: str = "info") -> JobEvent:
        return JobEvent(f"ftevent-{job_id}-{recorded.version}", "fine_tuning.job.event", created, level, message, kind, data)

    match event:
        case SessionStatusChanged(status=status, reason=reason):
            level = "error" if status is SessionStatus.FAILED else "info"
            yield one(f"Job {STATUSES[status]}" + (f": {reason}" if reason else ""), level=level)
        case TrainingProgressed(step=step, loss=loss):
            yield one(f"Step {step}: training loss={loss:.4f}", "metrics", {"step": step, "train_loss": loss})
        case Evaluated(step=step, phase=phase, valid_loss=loss, valid_token_accuracy=accuracy):
            data: dict[str, Any] = {"step": step, "phase": phase, "valid_loss": loss, "valid_mean_token_accuracy": accuracy}
            if event.task_score is not None:
                data |= {"task_score": event.task_score, "heldout_task_score": event.heldout_task_score}
            yield one(f"Step {step} ({phase}): validation loss={loss:.4f}, token accuracy={accuracy:.3f}", "metrics", data)
        case LayerProduced(layer_id=layer_id):
            yield one(f"Layer {layer_id} registered")
        case AttachDecided(reason=reason):
            yield one(reason[0].upper() + reason[1:])

