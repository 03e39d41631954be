"""Recipe references: `{{ EXPR }}` in a step's params, EXPR a JMESPath expression over
``{"inputs": {...}, "steps": {"<id>": {"output": ...}}}``.

A param whose whole value is one reference becomes the JSON value of EXPR, type kept; a
reference inside other text is interpolated as text. Parsing is the `jmespath` library's;
this module only finds the references and names what each one reads from the root.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import jmespath
from jmespath.exceptions import JMESPathError

from genome_service.domain.common import DomainError

REFERENCE = re.compile(r"\{\{\s*(.*?)\s*\}\}", re.DOTALL)
WHOLE = re.compile(r"^\s*\{\{\s*(.*?)\s*\}\}\s*$", re.DOTALL)
# Nodes whose first child is evaluated against the current value and the rest against its
# result: only the first can read the root (the rest read elements, e.g. a filter's fields).
_LEADING = frozenset({"subexpression", "index_expression", "projection", "value_projection", "filter_projection",
                      "flatten", "pipe"})


def compile_expression(expression: str, where: str) -> Any:
    """The parsed expression; ``expression_invalid`` naming ``where`` when it does not parse."""
    try:
        return jmespath.compile(expression)
    except (JMESPathError, ValueError, TypeError) as error:
        raise DomainError("expression_invalid", f"{where}: {expression!r} is not a JMESPath expression ({error})") from None


def expressions(value: Any) -> Iterator[str]:
    """Every reference's expression in a param value (strings, lists and objects, nested)."""
    if isinstance(value, str):
        yield from (match.group(1) for match in REFERENCE.finditer(value))
    elif isinstance(value, list):
        for item in value:
            yield from expressions(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from expressions(item)


def whole_reference(value: Any) -> str | None:
    """The expression of a param that is one reference and nothing else, if it is one."""
    match = WHOLE.match(value) if isinstance(value, str) else None
    return match.group(1) if match and "{{" not in match.group(1) else None


def has_reference(value: Any) -> bool:
    return next(expressions(value), None) is not None


def root_paths(parsed: Any) -> list[tuple[str, ...]]:
    """The field names each part of the expression reads from the root, e.g.
    ``("steps", "analyse", "output", "needs")`` for ``steps.analyse.output.needs[0]``."""
    return _paths(parsed.parsed)


def _paths(node: dict[str, Any]) -> list[tuple[str, ...]]:
    kind, children = node["type"], node.get("children") or []
    if kind == "field":
        return [(node["value"],)]
    if kind == "expref" or not children:
        return []  # a function's argument applied to elements, or a literal
    if kind not in _LEADING:
        return [path for child in children for path in _paths(child)]
    first = children[0]
    if kind == "subexpression" and first["type"] == "field":
        names = [first["value"]]
        for child in children[1:]:
            if child["type"] != "field":
                break
            names.append(child["value"])
        return [tuple(names)]
    return _paths(first)
