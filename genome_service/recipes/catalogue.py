"""The command catalogue: what a client may put in a step, and the check that a definition's
steps name known commands whose literal params fit their input schemas."""

from __future__ import annotations

from typing import Any

import msgspec

from genome_service.domain.common import DomainError, require
from genome_service.domain.expressions import has_reference
from genome_service.domain.recipe import Definition, RecipeStep
from genome_service.recipes.commands import COMMANDS, Spec


class CommandInfo(msgspec.Struct, frozen=True):
    name: str
    summary: str
    asynchronous: bool = msgspec.field(name="async")
    input_schema: dict[str, Any]
    output_schema: dict[str, Any]


def catalogue() -> list[CommandInfo]:
    """Every command with the JSON Schemas of its input and output, by name."""
    return [CommandInfo(spec.name, spec.summary, spec.awaits is not None, _schema(spec.input_type),
                        _schema(spec.output_type)) for spec in sorted(COMMANDS.values(), key=lambda s: s.name)]


def require_commands(definition: Definition) -> None:
    """Each step names a known command, asks `async` only of an asynchronous one, gives every param
    the command requires, none it does not know, and literal ones that fit their schema."""
    for step in definition.steps:
        spec = COMMANDS.get(step.command)
        require(spec is not None, "command_unknown",
                f"step {step.id!r}: no command {step.command!r} (GET /recipes/commands lists them)")
        assert spec is not None
        require(not step.asynchronous or spec.awaits is not None, "step_not_async",
                f"step {step.id!r}: {step.command} is not asynchronous; only {', '.join(_async())} may be")
        _require_params(step, spec)


def _require_params(step: RecipeStep, spec: Spec) -> None:
    fields = {field.encode_name: field for field in msgspec.structs.fields(spec.input_type)}
    unknown = sorted(set(step.params) - set(fields))
    require(not unknown, "param_unknown",
            f"step {step.id!r}: {step.command} takes no param {', '.join(map(repr, unknown))} (it takes {', '.join(fields)})")
    for name, field in fields.items():
        if name not in step.params:
            require(not field.required, "param_missing", f"step {step.id!r}: {step.command} needs param {name!r}")
            continue
        value = step.params[name]
        if has_reference(value):
            continue  # known only when the step runs: checked then
        try:
            msgspec.convert(value, field.type)
        except msgspec.ValidationError as error:
            raise DomainError("param_invalid", f"step {step.id!r}: param {name!r} of {step.command}: {error}") from None


def _async() -> list[str]:
    return [name for name, spec in COMMANDS.items() if spec.awaits is not None]


def _schema(kind: type) -> dict[str, Any]:
    # Inline: each schema stands alone in the catalogue, without a shared $defs section.
    schema, components = msgspec.json.schema_components([kind], ref_template="#/$defs/{name}")
    return {**schema[0], "$defs": components} if components else schema[0]
