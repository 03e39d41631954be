"""Recipes and their runs as feature services: define, revise, retire and read recipes; start,
follow and cancel runs. Workers run the runs (``executor``); these only append and read.

A recipe is private to its owner unless public; built-in recipes (``builtin``) are everyone's.
A recipe is named by its id or, for its owner (and for built-ins), by its name. A run acts as
the caller who started it, and only that caller sees it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import msgspec
import sqlalchemy as sa

from genome_service.domain.academy import TERMINAL as SESSION_ENDED
from genome_service.domain.common import DomainError
from genome_service.domain.recipe import RECIPE, Definition, DefineRecipe, RetireRecipe, ReviseRecipe, require_definition, run_inputs
from genome_service.domain.recipe_run import RECIPE_RUN, TERMINAL, CancelRun, RecipeRun, RunStatus, StartRun
from genome_service.projections.queries import Row, get_row
from genome_service.projections.tables import ACADEMY_SESSIONS, RECIPE_RUNS, RECIPES
from genome_service.recipes.builtin import BUILTIN, BUILTIN_OWNER
from genome_service.recipes.catalogue import CommandInfo, catalogue, require_commands
from genome_service.services.academy_sessions import AcademySessions
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command
from genome_service.services.creation import create_stream
from genome_service.services.errors import NotFound
from genome_service.services.reads import EventView, Page, Visibility, event_views, follow_stream, page, visible, visible_row

VISIBILITY = Visibility(RECIPES, "recipe_id", "recipe", archived="retired", public="public")
RETIRED_TOO = Visibility(RECIPES, "recipe_id", "recipe", archived=None, public="public")
RUNS = Visibility(RECIPE_RUNS, "run_id", "recipe_run", archived=None)


class RecipeView(msgspec.Struct, frozen=True):
    id: str
    owner: str
    name: str
    public: bool
    revision: int
    retired: bool
    builtin: bool
    definition: Definition
    version: int
    created_at: datetime | None  # None: built in
    updated_at: datetime | None


class StepView(msgspec.Struct, frozen=True):
    id: str
    command: str
    status: str  # waiting, running, awaiting, completed, skipped
    attempts: int
    output: Any = None
    reason: str = ""  # why it was skipped


class RunView(msgspec.Struct, frozen=True):
    id: str
    owner: str
    recipe_id: str
    recipe_name: str
    recipe_revision: int
    status: RunStatus
    reason: str
    inputs: dict[str, Any]
    steps: list[StepView]
    waiting_on: str | None  # the academy session an asynchronous step waits for
    output: Any
    version: int
    created_at: datetime
    updated_at: datetime


class RunSummary(msgspec.Struct, frozen=True):
    id: str
    recipe_id: str
    recipe_name: str
    recipe_revision: int
    status: RunStatus
    reason: str
    current_step: str | None
    steps_done: int
    step_count: int
    version: int
    created_at: datetime
    updated_at: datetime


def _builtin(name: str) -> RecipeView:
    return RecipeView(name, BUILTIN_OWNER, name, True, 1, False, True, BUILTIN[name], 1, None, None)


def _step_status(state: RecipeRun, step_id: str) -> str:
    if step_id in state.outputs:
        return "completed"
    if step_id in state.skipped:
        return "skipped"
    if state.current == step_id:
        return "awaiting" if state.awaited is not None else "running"
    return "waiting"


def _run_view(state: RecipeRun, row: Row) -> RunView:
    steps = [StepView(s.id, s.command, _step_status(state, s.id), state.attempts.get(s.id, 0), state.outputs.get(s.id),
                      state.skipped.get(s.id, "")) for s in state.definition.steps]
    return RunView(state.run_id, state.owner, state.recipe_id, state.recipe_name, state.recipe_revision, state.status,
                   state.reason, state.inputs, steps, row["waiting_on"], state.output, row["version"], row["created_at"],
                   row["updated_at"])


def _run_summary(row: Row) -> RunSummary:
    return RunSummary(row["run_id"], row["recipe_id"], row["recipe_name"], row["recipe_revision"], RunStatus(row["status"]),
                      row["reason"], row["current_step"], row["steps_done"], row["step_count"], row["version"],
                      row["created_at"], row["updated_at"])


def _definition(definition: Definition) -> None:
    require_definition(definition)  # its shape and references first: a command's schema is checked on known steps
    require_commands(definition)


class Recipes:
    def __init__(self, services: Services) -> None:
        self.services = services

    # Reads
    def commands(self) -> list[CommandInfo]:
        """The commands a step can run, with the JSON Schemas of their input and output."""
        return catalogue()

    def get(self, caller: Caller, recipe: str) -> RecipeView:
        """A recipe by id, or by name: a built-in one, else one of the caller's."""
        if recipe in BUILTIN:
            return _builtin(recipe)
        return self._view(self.row(caller, recipe)["recipe_id"])

    def list(self, caller: Caller, *, limit: int = 50, cursor: str | None = None) -> Page:
        """The built-in recipes (on the first page), then the caller's live ones and public ones, oldest first."""
        where = [sa.or_(RECIPES.c.owner == caller.owner, RECIPES.c.public.is_(True)), RECIPES.c.retired.is_(False)]
        rows, next_cursor = page(self.services, RECIPES, "recipe_id", where, cursor, limit)
        builtins = [_builtin(name) for name in BUILTIN] if cursor is None else []
        return Page([*builtins, *(self._view(row["recipe_id"]) for row in rows)], next_cursor)

    # Commands
    def define(self, command: Command, name: str, definition: Definition, *, public: bool = False) -> RecipeView:
        """A new recipe of the caller's; every rule is checked first, and a refused one stores nothing."""
        _definition(definition)
        if name in BUILTIN or self._named(command.caller, name) is not None:
            raise DomainError("recipe_name_exists", f"a recipe named {name!r} exists already: revise it instead")
        owner = command.owner
        outcome = create_stream(self.services, RECIPE, command.metadata,
                                lambda recipe_id: DefineRecipe(recipe_id, owner, name, definition, public))
        return self._view(outcome.aggregate.stream_id)

    def revise(self, command: Command, recipe: str, definition: Definition, *, public: bool | None = None) -> RecipeView:
        """A new revision; runs already started keep the one they started with."""
        return self._execute(command, recipe, ReviseRecipe(definition, public), check=definition)

    def retire(self, command: Command, recipe: str) -> RecipeView:
        """No new runs; runs under way go on."""
        return self._execute(command, recipe, RetireRecipe())

    def _execute(self, command: Command, recipe: str, change: object, *, check: Definition | None = None) -> RecipeView:
        row = self.row(command.caller, recipe, retired=True)
        if row["owner"] != command.owner:
            raise NotFound("recipe", recipe)  # another owner's public recipe: read-only
        if check is not None:
            _definition(check)
        self.services.commands.execute(RECIPE, row["recipe_id"], change, expected_version=command.expected_version,
                                       metadata=command.metadata)
        return self._view(row["recipe_id"])

    def _view(self, recipe_id: str) -> RecipeView:
        aggregate = self.services.repository.load(RECIPE, recipe_id)
        s = aggregate.state
        assert s is not None and aggregate.created_at and aggregate.updated_at
        return RecipeView(s.recipe_id, s.owner, s.name, s.public, s.revision, s.retired, False, s.definition,
                          aggregate.version, aggregate.created_at, aggregate.updated_at)

    def row(self, caller: Caller, recipe: str, *, retired: bool = False) -> Row:
        """A stored recipe the caller may see, by id or by the name of one of its own; a retired one
        is gone (410) unless ``retired``."""
        rule = RETIRED_TOO if retired else VISIBILITY
        named = self._named(caller, recipe)
        if named is not None:
            return visible(named, rule, recipe, caller)
        return visible_row(self.services, rule, recipe, caller)

    def _named(self, caller: Caller, name: str) -> Row | None:
        query = sa.select(RECIPES.c.recipe_id).where(RECIPES.c.owner == caller.owner, RECIPES.c.name == name,
                                                      RECIPES.c.retired.is_(False))
        with self.services.database.read() as connection:
            recipe_id = connection.execute(query).scalar()
            return get_row(connection, RECIPES, "recipe_id", recipe_id) if recipe_id else None


class RecipeRuns:
    def __init__(self, services: Services) -> None:
        self.services = services

    # Access
    def visible(self, caller: Caller, run_id: str, recipe: str | None = None) -> Row:
        """The run's row if it is the caller's (and, with ``recipe``, a run of that recipe: its id or name)."""
        row = visible_row(self.services, RUNS, run_id, caller)
        if recipe is not None and recipe not in (row["recipe_id"], row["recipe_name"]):
            raise NotFound("recipe_run", run_id)
        return row

    # Reads
    def get(self, caller: Caller, run_id: str, *, recipe: str | None = None) -> RunView:
        """One run: status, each step's status, attempts and output, and the run's output."""
        row = self.visible(caller, run_id, recipe)
        state = self.services.repository.load(RECIPE_RUN, run_id).state
        assert state is not None
        return _run_view(state, row)

    def list(self, caller: Caller, recipe: str | None = None, *, status: RunStatus | None = None, limit: int = 50,
             cursor: str | None = None) -> Page:
        """The caller's runs (of one recipe, when given), oldest first, a page at a time."""
        where = [RECIPE_RUNS.c.owner == caller.owner]
        if recipe is not None:  # a retired recipe's runs too
            recipe_id = recipe if recipe in BUILTIN else Recipes(self.services).row(caller, recipe, retired=True)["recipe_id"]
            where.append(RECIPE_RUNS.c.recipe_id == recipe_id)
        if status is not None:
            where.append(RECIPE_RUNS.c.status == status.value)
        rows, next_cursor = page(self.services, RECIPE_RUNS, "run_id", where, cursor, limit)
        return Page([_run_summary(row) for row in rows], next_cursor)

    def history(self, caller: Caller, run_id: str, *, recipe: str | None = None) -> list[EventView]:
        """The run's events so far, oldest first."""
        self.visible(caller, run_id, recipe)
        return event_views(self.services.store.read_stream(run_id))

    def follow(self, caller: Caller, run_id: str, *, recipe: str | None = None) -> AsyncIterator[EventView]:
        """Every event, history first, then live ones as they are appended, until the run ends."""
        self.visible(caller, run_id, recipe)
        return follow_stream(self.services, run_id, lambda: self.status(run_id) in TERMINAL)

    def status(self, run_id: str) -> RunStatus | None:
        """The run's status in the read model (what a worker polls to stop on a cancel)."""
        with self.services.database.read() as connection:
            row = get_row(connection, RECIPE_RUNS, "run_id", run_id)
        return None if row is None else RunStatus(row["status"])

    def waiting(self) -> list[str]:
        """Runs that need a worker, oldest first: pending or running ones (their worker may have died)
        that wait on nothing, or on an academy session that has ended."""
        active = (RunStatus.PENDING.value, RunStatus.RUNNING.value)
        ended = sa.select(ACADEMY_SESSIONS.c.session_id).where(ACADEMY_SESSIONS.c.status.in_([s.value for s in SESSION_ENDED]))
        query = (sa.select(RECIPE_RUNS.c.run_id)
                 .where(RECIPE_RUNS.c.status.in_(active),
                        sa.or_(RECIPE_RUNS.c.waiting_on.is_(None), RECIPE_RUNS.c.waiting_on.in_(ended)))
                 .order_by(RECIPE_RUNS.c.created_at))
        with self.services.database.read() as connection:
            return list(connection.execute(query).scalars())

    # Commands
    def start(self, command: Command, recipe: str, inputs: dict[str, Any]) -> RunView:
        """A pending run of the recipe's current revision with the inputs given (checked against
        their types, defaults for the rest); a worker takes it up."""
        found = Recipes(self.services).get(command.caller, recipe)
        pinned = run_inputs(found.definition, inputs)
        owner = command.owner
        outcome = create_stream(self.services, RECIPE_RUN, command.metadata, lambda run_id: StartRun(
            run_id, owner, found.id, found.name, found.revision, found.definition, pinned))
        return self.get(command.caller, outcome.aggregate.stream_id)

    def cancel(self, command: Command, run_id: str, *, recipe: str | None = None) -> RunView:
        """Cancel a pending or running run: its worker stops within a step, and an academy session it
        waits on is cancelled too; a finished run is refused (``run_finished``)."""
        self.visible(command.caller, run_id, recipe)
        outcome = self.services.commands.execute(RECIPE_RUN, run_id, CancelRun(f"cancelled by {command.owner}"),
                                                 expected_version=command.expected_version, metadata=command.metadata)
        cancelled = outcome.aggregate.state
        if cancelled is not None and cancelled.awaited is not None:
            try:
                AcademySessions(self.services).cancel(command.derived("session"), cancelled.awaited.stream_id)
            except DomainError as error:
                if error.rule != "session_finished":
                    raise
        return self.get(command.caller, run_id)
