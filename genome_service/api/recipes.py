"""Recipes over HTTP: define, read, revise and retire recipes, list the commands their steps can run,
and start, follow (JSON history or live SSE) and cancel their runs.

Runs are run by the academy workers (`genome-service academy worker`, or the server's own thread);
this controller only appends and reads.
"""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, MediaType, Request, Response, delete, get, post, put
from litestar.di import NamedDependency
from litestar.openapi.spec import OpenAPI
from litestar.params import FromPath, FromQuery, JSONBody, QueryParameter
from litestar.response import ServerSentEvent
from litestar.status_codes import HTTP_201_CREATED

from genome_service.api.conventions import created, sse_messages, with_etag
from genome_service.api.openapi import SSE, document_json_or_sse
from genome_service.domain.recipe import Definition, RecipeInput, RecipeStep
from genome_service.domain.recipe_run import RunStatus
from genome_service.recipes.catalogue import CommandInfo
from genome_service.recipes.service import RecipeRuns, Recipes, RecipeView, RunView
from genome_service.services.context import Caller, Command
from genome_service.services.reads import MAX_PAGE, EventView, Page


class RecipeRevision(msgspec.Struct, frozen=True, forbid_unknown_fields=True, kw_only=True):
    steps: list[RecipeStep]
    inputs: dict[str, RecipeInput] = {}
    description: str = ""
    output: str | None = None  # JMESPath over the run's data; default: the last step's output
    public: bool | None = None  # None: as it was (a new recipe: private)

    def definition(self) -> Definition:
        return Definition(self.steps, self.inputs, self.description, self.output)


class RecipeCreate(RecipeRevision, frozen=True, forbid_unknown_fields=True, kw_only=True):
    name: str


class RunCreate(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    inputs: dict[str, Any] = {}


def _location(recipe: RecipeView) -> str:
    return f"/recipes/{recipe.id}"


def _run_location(run: RunView) -> str:
    return f"/recipes/{run.recipe_id}/runs/{run.id}"


class RecipeController(Controller):
    path = "/recipes"
    tags = ["recipes"]
    recipes: Recipes
    runs: RecipeRuns

    @post("/", operation_id="createRecipe", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def create(self, command: NamedDependency[Command], data: JSONBody[RecipeCreate]) -> Response[RecipeView]:
        """Define a recipe; every step is checked first (422 naming the rule and the step), and nothing is stored on a refusal."""
        recipe = self.recipes.define(command, data.name, data.definition(), public=bool(data.public))
        return created(recipe, _location)

    @get("/", operation_id="listRecipes", sync_to_thread=False)
    def list(self, caller: NamedDependency[Caller], limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50,
             cursor: FromQuery[str | None] = None) -> Page:
        """The built-in recipes, then the caller's and the public ones, oldest first, a page at a time."""
        return self.recipes.list(caller, limit=limit, cursor=cursor)

    @get("/commands", operation_id="listRecipeCommands", sync_to_thread=False)
    def commands(self) -> list[CommandInfo]:
        """The commands a step can run, with the JSON Schemas of their input and output."""
        return self.recipes.commands()

    @get("/{recipe_id:str}", operation_id="getRecipe", sync_to_thread=False)
    def read(self, caller: NamedDependency[Caller], recipe_id: FromPath[str]) -> Response[RecipeView]:
        """One recipe by id (or by name: a built-in one, or the caller's), at its current revision."""
        recipe = self.recipes.get(caller, recipe_id)
        return with_etag(recipe, recipe.version)

    @put("/{recipe_id:str}", operation_id="reviseRecipe", sync_to_thread=False)
    def revise(self, command: NamedDependency[Command], recipe_id: FromPath[str],
               data: JSONBody[RecipeRevision]) -> Response[RecipeView]:
        """A new revision of one of the caller's recipes (checked as a new one is); runs already started keep theirs."""
        recipe = self.recipes.revise(command, recipe_id, data.definition(), public=data.public)
        return with_etag(recipe, recipe.version)

    @delete("/{recipe_id:str}", operation_id="retireRecipe", status_code=200, sync_to_thread=False)
    def retire(self, command: NamedDependency[Command], recipe_id: FromPath[str]) -> Response[RecipeView]:
        """Retire: no new runs (GET answers 410); runs under way go on."""
        recipe = self.recipes.retire(command, recipe_id)
        return with_etag(recipe, recipe.version)

    @post("/{recipe_id:str}/runs", operation_id="startRecipeRun", status_code=HTTP_201_CREATED, sync_to_thread=False)
    def start(self, command: NamedDependency[Command], recipe_id: FromPath[str], data: JSONBody[RunCreate]) -> Response[RunView]:
        """Start a run of the recipe's current revision with the inputs given (checked against their types); a worker runs it."""
        run = self.runs.start(command, recipe_id, data.inputs)
        return created(run, _run_location)

    @get("/{recipe_id:str}/runs", operation_id="listRecipeRuns", sync_to_thread=False)
    def runs_of(self, caller: NamedDependency[Caller], recipe_id: FromPath[str],
                limit: Annotated[int, QueryParameter(ge=1, le=MAX_PAGE)] = 50, cursor: FromQuery[str | None] = None,
                status: FromQuery[RunStatus | None] = None) -> Page:
        """The caller's runs of the recipe, oldest first, a page at a time."""
        return self.runs.list(caller, recipe_id, status=status, limit=limit, cursor=cursor)

    @get("/{recipe_id:str}/runs/{run_id:str}", operation_id="getRecipeRun", sync_to_thread=False)
    def run(self, caller: NamedDependency[Caller], recipe_id: FromPath[str], run_id: FromPath[str]) -> Response[RunView]:
        """One run: its status, each step's status, tries and output, and the run's output."""
        run = self.runs.get(caller, run_id, recipe=recipe_id)
        return with_etag(run, run.version)

    @post("/{recipe_id:str}/runs/{run_id:str}/cancel", operation_id="cancelRecipeRun", status_code=200, sync_to_thread=False)
    def cancel(self, command: NamedDependency[Command], recipe_id: FromPath[str], run_id: FromPath[str]) -> Response[RunView]:
        """Cancel a pending or running run (within its current step; an academy session it waits on too); 409 once finished."""
        run = self.runs.cancel(command, run_id, recipe=recipe_id)
        return with_etag(run, run.version)

    # The handler's media type is the stream's; the JSON answer names its own (as the academy's does).
    @get("/{recipe_id:str}/runs/{run_id:str}/events", operation_id="recipeRunEvents", media_type=SSE, sync_to_thread=False)
    def events(self, request: Request[Caller, None, None], caller: NamedDependency[Caller], recipe_id: FromPath[str],
               run_id: FromPath[str]) -> Response[list[EventView]]:
        """The run's history as JSON; with `Accept: text/event-stream`, history then live events until it ends."""
        if SSE in request.headers.get("accept", ""):
            return ServerSentEvent(sse_messages(self.runs.follow(caller, run_id, recipe=recipe_id)))
        return Response(self.runs.history(caller, run_id, recipe=recipe_id), media_type=MediaType.JSON)


def document_events(schema: OpenAPI) -> None:
    document_json_or_sse(
        schema, "/recipes/{recipe_id}/runs/{run_id}/events", "get", "Server-sent events, one per run event, named by its type"
    )
