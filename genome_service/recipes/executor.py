"""Runs one recipe run from wherever its events say it stands.

Before each step the executor appends what it decides (started, skipped) and after it the
result (completed with the output, failed with the reason, retried after a back-off), so a
run taken up again after a crash skips every step completed or skipped, and runs the step
that was under way again, with the same idempotency keys: what its first try appended is
replayed, not made twice. An asynchronous step records what it waits on and hands the run
back (no thread waits on it); a worker takes it up again once that has ended.

A run stops within a step of being cancelled, or of `stopping` being set (it then stays
running, for the next worker).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections.abc import Callable
from typing import Any

import msgspec

from genome_service.domain.common import DomainError
from genome_service.domain.recipe import RecipeStep
from genome_service.domain.recipe_run import (
    RECIPE_RUN,
    TERMINAL,
    AwaitStep,
    CancelRun,
    CompleteRun,
    CompleteStep,
    FailRun,
    FailStep,
    PickUpRun,
    RecipeRun,
    RunStatus,
    SkipStep,
    StartStep,
)
from genome_service.eventstore.records import EventMetadata
from genome_service.recipes.commands import COMMANDS, ChatTurn, StepContext
from genome_service.recipes.references import evaluate, resolve, truth
from genome_service.recipes.service import RecipeRuns
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command, command_metadata
from genome_service.services.refusals import refusal

log = logging.getLogger("genome_service.recipes")
CANCEL_POLL_SECONDS = 0.5


class RunCancelledError(Exception):
    """The run was cancelled while this worker ran it."""


class RunStopped(Exception):
    """The worker is shutting down: the run stays running for another to take up."""


class Executor:
    def __init__(self, services: Services, chat: ChatTurn, *, stopping: threading.Event | None = None) -> None:
        self.services = services
        self.chat = chat
        self.stopping = stopping or threading.Event()
        self.backoff = services.settings.recipe_retry_backoff_seconds

    def run(self, run_id: str) -> RecipeRun:
        """Run until the run ends, or an asynchronous step waits; return its state then."""
        state = self._state(run_id)
        if state.status in TERMINAL:
            return state
        if state.status is RunStatus.PENDING:
            state = self._execute(state, PickUpRun())
        try:
            while (step := state.next_step()) is not None:
                self._check(run_id)
                state = self._step(state, step)
                if state.status in TERMINAL or (state.current == step.id and state.awaited is not None):
                    return state
            self._finish(state)
        except (RunCancelledError, RunStopped):
            pass
        except Exception as exc:  # noqa: BLE001 - a bug or a broken store must end the run, not the worker
            frames = "".join(traceback.format_tb(exc.__traceback__))
            log.error("recipe run %s failed on an unexpected %s\n%s", run_id, type(exc).__name__, frames)
            self._ignoring_finished(run_id, FailRun(_reason(exc)))
        return self._state(run_id)

    # --- one step -------------------------------------------------------------------------

    def _step(self, state: RecipeRun, step: RecipeStep) -> RecipeRun:
        if state.current == step.id and state.awaited is not None:
            return self._wait(state, step)
        if state.current != step.id:  # else: under way when the last worker died; run it again
            if step.when is not None:
                value = evaluate(step.when, state.data(), f"step {step.id!r} when")
                if not truth(value):
                    reason = f"when {step.when!r} is {msgspec.json.encode(value).decode()}"
                    return self._execute(state, SkipStep(step.id, reason))
            state = self._execute(state, StartStep(step.id))
        spec = COMMANDS[step.command]
        try:
            params = resolve(step.params, state.data(), f"step {step.id!r}")
            given = msgspec.convert(params, spec.input_type)
        except (ValueError, msgspec.ValidationError) as exc:  # the data a reference gave: no try would differ
            return self._execute(state, FailStep(step.id, f"params: {exc}"))
        try:
            output = spec.run(self._context(state, step), given)
        except (RunCancelledError, RunStopped):
            raise
        except Exception as exc:  # noqa: BLE001 - a step's failure is the run's to record, whatever it is
            return self._failed(state, step, exc)
        if step.asynchronous:
            assert spec.awaits is not None
            state = self._execute(state, AwaitStep(step.id, spec.awaits(output)))
            return self._wait(state, step)
        return self._execute(state, CompleteStep(step.id, msgspec.to_builtins(output)))

    def _wait(self, state: RecipeRun, step: RecipeStep) -> RecipeRun:
        """Complete the step if what it waits on has ended; else leave it waiting."""
        spec = COMMANDS[step.command]
        assert spec.wait is not None and state.awaited is not None
        try:
            output = spec.wait(self._context(state, step), state.awaited)
        except Exception as exc:  # noqa: BLE001 - the awaited work's failure is the step's
            return self._execute(state, FailStep(step.id, _reason(exc)))
        if output is None:
            return state
        return self._execute(state, CompleteStep(step.id, msgspec.to_builtins(output)))

    def _failed(self, state: RecipeRun, step: RecipeStep, exc: Exception) -> RecipeRun:
        """Fail the try; wait and leave the step to be tried again while tries are left, else fail the run."""
        attempt = state.attempts[step.id]
        tries = step.retry.attempts if step.retry is not None else 1
        if attempt >= tries:
            return self._execute(state, FailStep(step.id, _reason(exc)))
        delay = self.backoff * 2 ** (attempt - 1)
        state = self._execute(state, FailStep(step.id, _reason(exc), retry_in=delay))
        deadline = time.monotonic() + delay
        while (left := deadline - time.monotonic()) > 0:
            self._check(state.run_id)
            self.stopping.wait(min(left, CANCEL_POLL_SECONDS))
        return state

    def _finish(self, state: RecipeRun) -> None:
        definition = state.definition
        if definition.output is not None:
            output = evaluate(definition.output, state.data(), "output")
        else:
            done = [s.id for s in definition.steps if s.id in state.outputs]
            output = state.outputs[done[-1]] if done else None
        self._execute(state, CompleteRun(output))

    # --- the run's stream -----------------------------------------------------------------

    def _context(self, state: RecipeRun, step: RecipeStep) -> StepContext:
        # Keyed by (run, step): a step run again replays what its first try appended.
        metadata = command_metadata(state.owner, "recipe-run", idempotency_key=f"{state.run_id}:{step.id}")
        return StepContext(self.services, Command(Caller(state.owner), metadata), self.chat,
                           self._cancel_check(state.run_id))

    def _cancel_check(self, run_id: str) -> Callable[[], bool]:
        """For loops that call it often (every token): asks the database at most every CANCEL_POLL_SECONDS."""
        last = [time.monotonic()]

        def check() -> bool:
            if self.stopping.is_set():
                raise RunStopped(run_id)
            now = time.monotonic()
            if now - last[0] >= CANCEL_POLL_SECONDS:
                last[0] = now
                self._check(run_id)
            return False

        return check

    def _check(self, run_id: str) -> None:
        if self.stopping.is_set():
            raise RunStopped(run_id)
        if RecipeRuns(self.services).status(run_id) is RunStatus.CANCELLED:
            raise RunCancelledError(run_id)

    def _state(self, run_id: str) -> RecipeRun:
        state = self.services.repository.load(RECIPE_RUN, run_id).state
        if state is None:
            raise DomainError("recipe_run_not_found", f"recipe run {run_id!r} does not exist")
        return state

    def _execute(self, state: RecipeRun, command: Any) -> RecipeRun:
        """Append; a run cancelled meanwhile refuses (``run_finished``), which stops this worker's work on it."""
        try:
            outcome = self.services.commands.execute(RECIPE_RUN, state.run_id, command,
                                                     metadata=EventMetadata(actor=state.owner))
        except DomainError as error:
            if error.rule == "run_finished" and self._state(state.run_id).status is RunStatus.CANCELLED:
                raise RunCancelledError(state.run_id) from None
            raise
        assert outcome.aggregate.state is not None
        return outcome.aggregate.state

    def _ignoring_finished(self, run_id: str, command: FailRun | CancelRun) -> None:
        try:
            self.services.commands.execute(RECIPE_RUN, run_id, command, metadata=EventMetadata(actor="recipes"))
        except DomainError:
            pass  # cancelled meanwhile: that status stands


def _reason(exc: BaseException) -> str:
    found = refusal(exc)
    text = f"{found.rule}: {found.detail}" if found is not None else f"{type(exc).__name__}: {exc}"
    return text[:2000]
