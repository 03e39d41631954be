"""The union of a batch's LoRA layers: which layers, where each sits, and each row's gains.

Rows decoded together may each use a different stack. For one projection, the union holds
every layer any row uses once, concatenated along the rank axis in first-use order; row
i's gains G[i] are w_l s_l over layer l's columns when its stack holds l, and 0 elsewhere,
so ((x A_U^T) * G) B_U^T is each row's own stack exactly (`inference.backends.torch_batch`).
Backends turn the plan into their own arrays; this module is the part they share.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

import numpy as np

from inference.lora.stack import LoraStack, StackPart

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class UnionPlan:
    parts: Mapping[str, StackPart]  # layer id -> its factors (the same adapter in every row)
    # projection -> (the layers that target it, in column order; gains (rows, R_U) float32)
    modules: Mapping[str, tuple[tuple[str, ...], np.ndarray]]


def plan_union(stacks: Sequence[LoraStack | None]) -> UnionPlan:
    """The union for rows with these stacks (None: a row with no stack, all gains 0)."""
    parts: dict[str, StackPart] = {}
    for stack in stacks:
        for part in stack.parts if stack is not None else ():
            parts.setdefault(part.layer_id, part)
    modules: dict[str, tuple[tuple[str, ...], np.ndarray]] = {}
    for name in sorted({name for part in parts.values() for name in part.modules}):
        columns: dict[str, slice] = {}
        start = 0
        for layer_id, part in parts.items():
            if name in part.modules:
                rank = part.modules[name][0].shape[0]
                columns[layer_id] = slice(start, start + rank)
                start += rank
        gains = np.zeros((len(stacks), start), dtype=np.float32)
        for row, stack in enumerate(stacks):
            for part in stack.parts if stack is not None else ():
                if part.layer_id in columns:
                    gains[row, columns[part.layer_id]] = part.gain
        modules[name] = (tuple(columns), gains)
    return UnionPlan(parts, modules)


class ConvertedLayers(Generic[T]):
    """Layers in a backend's own arrays, converted once while in use (least recently used dropped)."""

    def __init__(self, convert: Callable[[StackPart], dict[str, T]], size: int = 64) -> None:
        self._convert = convert
        self._size = size
        self._entries: OrderedDict[str, tuple[StackPart, dict[str, T]]] = OrderedDict()

    def get(self, part: StackPart) -> dict[str, T]:
        found = self._entries.get(part.layer_id)
        # The same id always names the same adapter; checking the source arrays as well
        # means a row can never be given factors converted from other arrays than its own.
        if found is not None and all(found[0].modules.get(name, (None,))[0] is a for name, (a, _) in part.modules.items()):
            self._entries.move_to_end(part.layer_id)
            return found[1]
        converted = self._convert(part)
        self._entries[part.layer_id] = (part, converted)
        if len(self._entries) > self._size:
            self._entries.popitem(last=False)
        return converted
