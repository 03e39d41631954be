"""What every aggregate shares: the error type, validation helpers and the decider shape."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Generic, TypeVar

import msgspec

S = TypeVar("S")
E = TypeVar("E")
C = TypeVar("C")


class DomainError(Exception):
    """A command broke a rule of the domain; ``rule`` names it for callers and tests."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(message)
        self.rule = rule
        self.message = message


def require(condition: bool, rule: str, message: str) -> None:
    if not condition:
        raise DomainError(rule, message)


def require_text(value: str, field: str, *, max_length: int = 10_000) -> None:
    require(bool(value.strip()), f"{field}_required", f"{field} must not be empty")
    require(
        len(value) <= max_length,
        f"{field}_too_long",
        f"{field} must be at most {max_length} characters (got {len(value)})",
    )


def require_weight(weight: float) -> None:
    require(
        math.isfinite(weight) and 0.0 <= weight <= 1.0,
        "weight_out_of_range",
        f"weight must be a finite number in [0, 1] (got {weight})",
    )


def require_exists(state: object | None, kind: str) -> None:
    require(state is not None, f"{kind}_not_found", f"the {kind} does not exist")


def require_new(state: object | None, kind: str) -> None:
    require(state is None, f"{kind}_exists", f"the {kind} already exists")


def require_not_archived(archived: bool, kind: str) -> None:
    require(not archived, f"{kind}_archived", f"the {kind} is archived and can no longer change")


class Decider(msgspec.Struct, Generic[C, E, S], frozen=True):
    """An aggregate type as data: its stream type, event union, state type and functions.

    ``decide(command, state)`` returns the events a command produces (or raises
    ``DomainError``); ``evolve(state, event)`` folds one event into the state. A
    stream that does not exist yet has state ``None``.
    """

    stream_type: str
    event_type: Any
    state_type: type[S]
    decide: Callable[[C, S | None], Sequence[E]]
    evolve: Callable[[S | None, E], S]

    def fold(self, state: S | None, events: Sequence[E]) -> S | None:
        evolve = self.evolve
        for event in events:
            state = evolve(state, event)
        return state
