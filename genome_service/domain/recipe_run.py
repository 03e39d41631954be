"""Recipe run: one execution of a recipe at the revision it started with, as a process of events.

Steps run in the definition's order. Each is started, then completed with its output,
skipped with the reason, or failed with the reason (and retried while tries are left).
An asynchronous step records what it waits on; the run is then taken up again only once
that has ended. A completed or skipped step is never started again: a run resumed after
a crash goes on from the first step that is neither.
"""

from __future__ import annotations

import enum
from typing import Any

import msgspec

from genome_service.domain.common import Decider, DomainError, require, require_exists, require_new
from genome_service.domain.recipe import Definition, RecipeStep

STREAM_TYPE = "recipe_run"


class RunStatus(enum.StrEnum):
    PENDING = "pending"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


class Awaited(msgspec.Struct, frozen=True, gc=False):
    """What an asynchronous step waits on: a stream of another process (an academy session)."""

    stream_type: str
    stream_id: str


# Events
class RunStarted(msgspec.Struct, frozen=True, gc=False, tag=True):
    run_id: str
    owner: str
    recipe_id: str
    recipe_name: str
    recipe_revision: int
    definition: Definition  # pinned: a revision made later does not change this run
    inputs: dict[str, Any]


class RunPickedUp(msgspec.Struct, frozen=True, gc=False, tag=True):
    """A worker took the run up: it is running (a worker that dies leaves it so, for the next)."""


class StepStarted(msgspec.Struct, frozen=True, gc=False, tag=True):
    step_id: str
    attempt: int


class StepAwaiting(msgspec.Struct, frozen=True, gc=False, tag=True):
    step_id: str
    awaited: Awaited


class StepCompleted(msgspec.Struct, frozen=True, gc=False, tag=True):
    step_id: str
    output: Any


class StepSkipped(msgspec.Struct, frozen=True, gc=False, tag=True):
    step_id: str
    reason: str


class StepFailed(msgspec.Struct, frozen=True, gc=False, tag=True):
    step_id: str
    attempt: int
    reason: str


class StepRetried(msgspec.Struct, frozen=True, gc=False, tag=True):
    step_id: str
    attempt: int  # the try about to start
    delay_seconds: float


class RunCompleted(msgspec.Struct, frozen=True, gc=False, tag=True):
    output: Any


class RunFailed(msgspec.Struct, frozen=True, gc=False, tag=True):
    reason: str
    step_id: str | None = None


class RunCancelled(msgspec.Struct, frozen=True, gc=False, tag=True):
    reason: str


RunEvent = (RunStarted | RunPickedUp | StepStarted | StepAwaiting | StepCompleted | StepSkipped | StepFailed
            | StepRetried | RunCompleted | RunFailed | RunCancelled)


# State
class RecipeRun(msgspec.Struct, frozen=True, gc=False):
    run_id: str
    owner: str
    recipe_id: str
    recipe_name: str
    recipe_revision: int
    definition: Definition
    inputs: dict[str, Any]
    status: RunStatus = RunStatus.PENDING
    reason: str = ""
    outputs: dict[str, Any] = {}  # step id -> output, of completed steps
    skipped: dict[str, str] = {}  # step id -> why
    attempts: dict[str, int] = {}  # step id -> tries started
    current: str | None = None  # the step started and not yet finished
    awaited: Awaited | None = None  # what the current step waits on
    output: Any = None

    def next_step(self) -> RecipeStep | None:
        """The first step neither completed nor skipped."""
        return next((s for s in self.definition.steps if s.id not in self.outputs and s.id not in self.skipped), None)

    def data(self) -> dict[str, Any]:
        """What expressions read: the inputs and the outputs of the steps completed so far."""
        return {"inputs": self.inputs, "steps": {step: {"output": out} for step, out in self.outputs.items()}}


# Commands
class StartRun(msgspec.Struct, frozen=True, gc=False):
    run_id: str
    owner: str
    recipe_id: str
    recipe_name: str
    recipe_revision: int
    definition: Definition
    inputs: dict[str, Any]


class PickUpRun(msgspec.Struct, frozen=True, gc=False):
    pass


class StartStep(msgspec.Struct, frozen=True, gc=False):
    step_id: str


class AwaitStep(msgspec.Struct, frozen=True, gc=False):
    step_id: str
    awaited: Awaited


class CompleteStep(msgspec.Struct, frozen=True, gc=False):
    step_id: str
    output: Any


class SkipStep(msgspec.Struct, frozen=True, gc=False):
    step_id: str
    reason: str


class FailStep(msgspec.Struct, frozen=True, gc=False):
    step_id: str
    reason: str
    retry_in: float | None = None  # seconds until the next try; None: the run fails


class CompleteRun(msgspec.Struct, frozen=True, gc=False):
    output: Any


class FailRun(msgspec.Struct, frozen=True, gc=False):
    """The run fails outside any step (its output expression, a bug)."""

    reason: str


class CancelRun(msgspec.Struct, frozen=True, gc=False):
    reason: str


RunCommand = (StartRun | PickUpRun | StartStep | AwaitStep | CompleteStep | SkipStep | FailStep | CompleteRun | FailRun
              | CancelRun)


def decide(command: RunCommand, state: RecipeRun | None) -> list[RunEvent]:
    if isinstance(command, StartRun):
        require_new(state, "recipe_run")
        return [RunStarted(**msgspec.structs.asdict(command))]
    require_exists(state, "recipe_run")
    assert state is not None
    require(state.status not in TERMINAL, "run_finished",
            f"run {state.run_id} is {state.status.value} and can no longer change")
    match command:
        case PickUpRun():
            require(state.status is RunStatus.PENDING, "run_started", f"run {state.run_id} is already taken up")
            return [RunPickedUp()]
        case CancelRun(reason=reason):
            return [RunCancelled(reason)]
        case FailRun(reason=reason):
            return [RunFailed(reason)]
        case CompleteRun(output=output):
            require(state.next_step() is None, "run_has_open_steps", f"run {state.run_id} has steps left to run")
            return [RunCompleted(output)]
    step = state.next_step()
    step_id = getattr(command, "step_id", None)
    require(step is not None and step.id == step_id, "step_out_of_order",
            f"run {state.run_id}: step {step_id!r} is not the next one ({step.id if step else 'none'!r} is)")
    assert step is not None
    started = state.current == step.id
    match command:
        case StartStep():
            require(not started, "step_running", f"step {step.id!r} is already started")
            return [StepStarted(step.id, state.attempts.get(step.id, 0) + 1)]
        case SkipStep(reason=reason):
            require(not started, "step_running", f"step {step.id!r} is already started")
            return [StepSkipped(step.id, reason)]
    require(started, "step_not_started", f"step {step.id!r} must be started first")
    match command:
        case AwaitStep(awaited=awaited):
            require(step.asynchronous and state.awaited is None, "step_not_awaiting",
                    f"step {step.id!r} is not an asynchronous step that has yet to start its work")
            return [StepAwaiting(step.id, awaited)]
        case CompleteStep(output=output):
            return [StepCompleted(step.id, output)]
        case FailStep(reason=reason, retry_in=retry_in):
            attempt = state.attempts[step.id]
            if retry_in is None:
                return [StepFailed(step.id, attempt, reason), RunFailed(f"step {step.id!r} failed: {reason}", step.id)]
            return [StepFailed(step.id, attempt, reason), StepRetried(step.id, attempt + 1, retry_in)]
    raise DomainError("unknown_command", f"recipe run cannot handle {type(command).__name__}")


def evolve(state: RecipeRun | None, event: RunEvent) -> RecipeRun:
    match event:
        case RunStarted():
            return RecipeRun(**msgspec.structs.asdict(event))
    assert state is not None, f"{type(event).__name__} before RunStarted"
    replace = msgspec.structs.replace
    match event:
        case RunPickedUp():
            return replace(state, status=RunStatus.RUNNING)
        case StepStarted(step_id=step_id, attempt=attempt):
            return replace(state, current=step_id, attempts={**state.attempts, step_id: attempt})
        case StepAwaiting(awaited=awaited):
            return replace(state, awaited=awaited)
        case StepCompleted(step_id=step_id, output=output):
            return replace(state, outputs={**state.outputs, step_id: output}, current=None, awaited=None)
        case StepSkipped(step_id=step_id, reason=reason):
            return replace(state, skipped={**state.skipped, step_id: reason})
        case StepFailed():
            return replace(state, current=None, awaited=None)
        case StepRetried():
            return state
        case RunCompleted(output=output):
            return replace(state, status=RunStatus.COMPLETED, output=output)
        case RunFailed(reason=reason):
            return replace(state, status=RunStatus.FAILED, reason=reason)
        case RunCancelled(reason=reason):
            return replace(state, status=RunStatus.CANCELLED, reason=reason, current=None)
    raise TypeError(f"unknown recipe run event {type(event).__name__}")


RECIPE_RUN = Decider(
    stream_type=STREAM_TYPE,
    event_type=RunEvent,
    state_type=RecipeRun,
    decide=decide,
    evolve=evolve,
)
