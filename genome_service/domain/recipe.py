"""Recipe: a named, versioned pipeline of steps, each a command whose params may refer to the
recipe's inputs and to earlier steps' outputs (see ``expressions``).

The rules here are the definition's shape: names, inputs and their defaults, step ids, the
expressions and what they refer to. Whether a step's command exists and its literal params
fit the command's schema is the command registry's to say (``genome_service/recipes``),
checked before anything is decided.
"""

from __future__ import annotations

import re
from typing import Any, Literal

import msgspec

from genome_service.domain.common import Decider, DomainError, require, require_exists, require_new, require_text
from genome_service.domain.expressions import compile_expression, expressions, root_paths

STREAM_TYPE = "recipe"
MAX_STEPS = 50
MAX_INPUTS = 50
MAX_ATTEMPTS = 10
# Step ids and input names are JMESPath identifiers as written: `steps.analyse.output`.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
InputType = Literal["string", "number", "integer", "boolean", "array", "object"]


def fits(kind: str, value: Any) -> bool:
    """Whether a JSON value is of a declared input type (a bool is no number, an integer is a number)."""
    match kind:
        case "string":
            return isinstance(value, str)
        case "integer":
            return isinstance(value, int) and not isinstance(value, bool)
        case "number":
            return isinstance(value, (int, float)) and not isinstance(value, bool)
        case "boolean":
            return isinstance(value, bool)
        case "array":
            return isinstance(value, list)
    return isinstance(value, dict)


class RecipeInput(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    type: InputType
    default: Any = msgspec.UNSET  # absent: the input is required
    description: str = ""

    @property
    def required(self) -> bool:
        return self.default is msgspec.UNSET


class Retry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    attempts: int = 3  # tries in all, the first included; the wait between them is a setting


class RecipeStep(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    id: str
    command: str
    params: dict[str, Any] = {}
    # The step starts its work and the run waits for its end without a worker thread.
    asynchronous: bool = msgspec.field(default=False, name="async")
    retry: Retry | None = None
    when: str | None = None  # JMESPath: the step runs only if the result is true (JMESPath truth)


class Definition(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    steps: list[RecipeStep]
    inputs: dict[str, RecipeInput] = {}
    description: str = ""
    output: str | None = None  # JMESPath over the run's data; default: the last step's output


# Events
class RecipeDefined(msgspec.Struct, frozen=True, gc=False, tag=True):
    recipe_id: str
    owner: str
    name: str
    definition: Definition
    public: bool = False


class RecipeRevised(msgspec.Struct, frozen=True, gc=False, tag=True):
    revision: int
    definition: Definition
    public: bool = False


class RecipeRetired(msgspec.Struct, frozen=True, gc=False, tag=True):
    pass


RecipeEvent = RecipeDefined | RecipeRevised | RecipeRetired


# State
class Recipe(msgspec.Struct, frozen=True, gc=False):
    recipe_id: str
    owner: str
    name: str
    definition: Definition
    public: bool = False
    revision: int = 1
    retired: bool = False


# Commands
class DefineRecipe(msgspec.Struct, frozen=True, gc=False):
    recipe_id: str
    owner: str
    name: str
    definition: Definition
    public: bool = False


class ReviseRecipe(msgspec.Struct, frozen=True, gc=False):
    definition: Definition
    public: bool | None = None  # None: as it was


class RetireRecipe(msgspec.Struct, frozen=True, gc=False):
    pass


RecipeCommand = DefineRecipe | ReviseRecipe | RetireRecipe


def decide(command: RecipeCommand, state: Recipe | None) -> list[RecipeEvent]:
    if isinstance(command, DefineRecipe):
        require_new(state, "recipe")
        require_name(command.name)
        require_definition(command.definition)
        return [RecipeDefined(command.recipe_id, command.owner, command.name, command.definition, command.public)]
    require_exists(state, "recipe")
    assert state is not None
    require(not state.retired, "recipe_archived", f"recipe {state.name!r} is retired and can no longer change")
    match command:
        case ReviseRecipe(definition=definition, public=public):
            require_definition(definition)
            return [RecipeRevised(state.revision + 1, definition, state.public if public is None else public)]
        case RetireRecipe():
            return [RecipeRetired()]
    raise DomainError("unknown_command", f"recipe cannot handle {type(command).__name__}")


def evolve(state: Recipe | None, event: RecipeEvent) -> Recipe:
    match event:
        case RecipeDefined():
            return Recipe(event.recipe_id, event.owner, event.name, event.definition, event.public)
    assert state is not None, f"{type(event).__name__} before RecipeDefined"
    match event:
        case RecipeRevised(revision=revision, definition=definition, public=public):
            return msgspec.structs.replace(state, revision=revision, definition=definition, public=public)
        case RecipeRetired():
            return msgspec.structs.replace(state, retired=True)
    raise TypeError(f"unknown recipe event {type(event).__name__}")


# Rules
def require_name(name: str) -> None:
    require_text(name, "name", max_length=200)
    require(RECIPE_NAME.fullmatch(name) is not None, "name_invalid",
            f"a recipe's name is letters, digits, '-', '_' and '.', starting with a letter or digit (got {name!r})")


def require_definition(definition: Definition) -> None:
    """The definition's shape: inputs, step ids, and every expression and what it refers to."""
    require(0 < len(definition.steps) <= MAX_STEPS, "steps_out_of_range",
            f"a recipe has 1..{MAX_STEPS} steps (got {len(definition.steps)})")
    require(len(definition.inputs) <= MAX_INPUTS, "inputs_out_of_range", f"a recipe has at most {MAX_INPUTS} inputs")
    require(len(definition.description) <= 2000, "description_too_long", "description must be at most 2000 characters")
    for name, spec in definition.inputs.items():
        require(IDENTIFIER.fullmatch(name) is not None, "input_name_invalid",
                f"input {name!r}: a name is a letter or '_' then letters, digits or '_' (at most 64)")
        require(spec.required or fits(spec.type, spec.default), "input_default_invalid",
                f"input {name!r}: the default {spec.default!r} is not of type {spec.type}")
    ids = [step.id for step in definition.steps]
    for index, step in enumerate(definition.steps):
        require(IDENTIFIER.fullmatch(step.id) is not None, "step_id_invalid",
                f"step {step.id!r}: an id is a letter or '_' then letters, digits or '_' (at most 64)")
        require(step.id not in ids[:index], "step_id_repeated", f"step {step.id!r}: the id is used by an earlier step")
        if step.retry is not None:
            require(1 <= step.retry.attempts <= MAX_ATTEMPTS, "retry_attempts_out_of_range",
                    f"step {step.id!r}: retry.attempts must be within 1..{MAX_ATTEMPTS} (got {step.retry.attempts})")
        where = f"step {step.id!r}"
        for expression in [*expressions(step.params), *([step.when] if step.when is not None else [])]:
            _require_references(expression, where, definition, ids[:index], ids[index + 1:], step.id)
    if definition.output is not None:
        _require_references(definition.output, "output", definition, ids, [], None)


def run_inputs(definition: Definition, given: dict[str, Any]) -> dict[str, Any]:
    """A run's inputs: the given ones checked against their declared types, defaults for the rest."""
    unknown = sorted(set(given) - set(definition.inputs))
    require(not unknown, "input_unknown", f"the recipe has no input {', '.join(map(repr, unknown))}")
    inputs = {}
    for name, spec in definition.inputs.items():
        if name not in given:
            require(not spec.required, "input_missing", f"input {name!r} ({spec.type}) is required")
            inputs[name] = spec.default
            continue
        require(fits(spec.type, given[name]), "input_type_mismatch",
                f"input {name!r} must be of type {spec.type} (got {given[name]!r})")
        inputs[name] = given[name]
    return inputs


def _require_references(expression: str, where: str, definition: Definition, earlier: list[str], later: list[str],
                        itself: str | None) -> None:
    parsed = compile_expression(expression, where)
    for path in root_paths(parsed):
        root, name = path[0], path[1] if len(path) > 1 else None
        require(root in ("inputs", "steps"), "reference_unknown_root",
                f"{where}: {expression!r} reads {root!r}; an expression reads inputs.NAME or steps.ID.output")
        if name is None:
            continue
        if root == "inputs":
            require(name in definition.inputs, "reference_unknown_input", f"{where}: {expression!r} refers to no input {name!r}")
        elif name == itself:
            raise DomainError("reference_to_itself", f"{where}: {expression!r} refers to the step itself")
        elif name in later:
            raise DomainError("reference_to_later_step", f"{where}: {expression!r} refers to step {name!r}, which runs later")
        else:
            require(name in earlier, "reference_to_missing_step", f"{where}: {expression!r} refers to no step {name!r}")


RECIPE = Decider(
    stream_type=STREAM_TYPE,
    event_type=RecipeEvent,
    state_type=Recipe,
    decide=decide,
    evolve=evolve,
)
