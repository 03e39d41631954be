"""Resolving a step's params and `when` against a run's data (see ``domain.expressions``)."""

from __future__ import annotations

from typing import Any

import msgspec
from jmespath.exceptions import JMESPathError

from genome_service.domain.expressions import REFERENCE, compile_expression, whole_reference


class ReferenceFailed(ValueError):
    """An expression could not be evaluated on the run's data (a function given the wrong type)."""


def evaluate(expression: str, data: dict[str, Any], where: str) -> Any:
    try:
        return compile_expression(expression, where).search(data)
    except JMESPathError as error:
        raise ReferenceFailed(f"{where}: {expression!r} failed on the run's data ({error})") from None


def resolve(value: Any, data: dict[str, Any], where: str) -> Any:
    """``value`` with every reference replaced: a whole-value one by the JSON value, type kept;
    one inside other text by its text (strings as they are, anything else as JSON)."""
    if isinstance(value, str):
        whole = whole_reference(value)
        if whole is not None:
            return evaluate(whole, data, where)
        return REFERENCE.sub(lambda match: _text(evaluate(match.group(1), data, where)), value)
    if isinstance(value, list):
        return [resolve(item, data, where) for item in value]
    if isinstance(value, dict):
        return {key: resolve(item, data, where) for key, item in value.items()}
    return value


def truth(value: Any) -> bool:
    """JMESPath's truth: false, null, and empty strings, lists and objects are false; numbers are true."""
    if value is None or value is False:
        return False
    return not (isinstance(value, (str, list, dict)) and len(value) == 0)


def _text(value: Any) -> str:
    return value if isinstance(value, str) else msgspec.json.encode(value).decode()
