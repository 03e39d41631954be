"""Assemble a persona's weighted LoRA layers into one exact stack per projection.

For one projection W (out, in) and layers i with weight w_i, scale s_i and factors
A_i (r_i, in), B_i (out, r_i), the persona's output is

    y = W x + sum_i w_i s_i B_i (A_i x)

Concatenating along the rank axis, A_cat = [A_1; A_2; ...] (R, in) and
B_cat = [w_1 s_1 B_1, w_2 s_2 B_2, ...] (out, R) with R = sum_i r_i, gives

    B_cat (A_cat x) = sum_i (w_i s_i B_i) (A_i x)

exactly (a block matrix product), so a backend applies any stack with two matmuls of a
fixed shape. The layer order is kept as a precedence rule (it fixes the block order and
the stack's key); it does not change the sum.

A stack also keeps its layers unscaled, as `parts` (each with its gain g_i = w_i s_i and
its factors shared with the adapter cache, not copied): a batch of rows with different
stacks needs the layers one by one, to store each once and give each row its own gains.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from inference.lora.adapter import Canonical

# (layer id, weight, canonical factors, the adapter's own scale)
StackLayer = tuple[str, float, Canonical, float]


@dataclass(frozen=True, slots=True, eq=False)
class StackPart:
    """One layer of a stack: its unscaled factors and the gain w * s it enters the sum with."""

    layer_id: str
    gain: float  # float32(w * s), the factor assemble() multiplies B by
    modules: Mapping[str, tuple[np.ndarray, np.ndarray]]  # A (r, in), B (out, r) float32, read-only


@dataclass(frozen=True, slots=True, eq=False)
class LoraStack:
    """Rank-concatenated LoRA factors for one ordered, weighted list of layers."""

    key: str  # sha256 of the ordered ((layer_id, weight), ...): see `stack_key`
    layers: tuple[tuple[str, float], ...]  # order = precedence rule
    # "layers.{i}.{module}" -> (A_cat (R, in), B_cat (out, R)) float32; B_cat's block i is
    # already multiplied by w_i * s_i, so y = W x + B_cat @ (A_cat @ x) exactly.
    modules: Mapping[str, tuple[np.ndarray, np.ndarray]]
    parts: tuple[StackPart, ...]  # the layers with a non-zero weight, in order

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self.modules.values())


def stack_key(layers: Sequence[tuple[str, float]], scales: Sequence[float | None] = ()) -> str:
    """The cache key of an ordered, weighted list of layer ids (order matters), and of the
    scales that replace some adapters' own (None keeps a layer's own; none given, the key is
    that of the layers alone)."""
    # repr(float) round-trips exactly, so 0.1 and 0.1000000001 get different keys.
    entries: list[list[str]] = [[layer_id, repr(float(weight))] for layer_id, weight in layers]
    if any(scale is not None for scale in scales):
        entries = [entry + ([repr(float(scale))] if scale is not None else []) for entry, scale in zip(entries, scales, strict=True)]
    return hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def assemble(layers: Sequence[StackLayer], key: str | None = None) -> LoraStack:
    """Concatenate each layer's (A, B) along the rank axis, B scaled by weight * scale.

    `key` names the stack where the scales are not all the adapters' own (see `stack_key`):
    backends cache converted weights by it."""
    seen: set[str] = set()
    for layer_id, weight, _, scale in layers:
        if layer_id in seen:
            raise ValueError(f"stack: expected each layer once, got {layer_id!r} twice")
        seen.add(layer_id)
        for name, value in (("weight", weight), ("scale", scale)):
            if not math.isfinite(value):
                raise ValueError(f"stack: layer {layer_id!r}: expected a finite {name}, got {value!r}")
    blocks: dict[str, tuple[list[np.ndarray], list[np.ndarray]]] = {}
    parts = []
    for layer_id, weight, canonical, scale in layers:
        # A zero weight contributes exactly nothing; leaving it out keeps R small.
        if weight == 0.0:
            continue
        factor = np.float32(weight * scale)
        raw = {}
        for module, (a, b) in canonical.items():
            _check_pair(layer_id, module, a, b, blocks.get(module))
            raw[module] = (_frozen(a), _frozen(b))
            a_blocks, b_blocks = blocks.setdefault(module, ([], []))
            a_blocks.append(raw[module][0])
            b_blocks.append(raw[module][1] * factor)
        parts.append(StackPart(layer_id, float(factor), raw))
    modules = {
        module: (_frozen(np.concatenate(a_blocks, axis=0)), _frozen(np.concatenate(b_blocks, axis=1)))
        for module, (a_blocks, b_blocks) in blocks.items()
    }
    ordered = tuple((layer_id, float(weight)) for layer_id, weight, _, _ in layers)
    return LoraStack(key=key or stack_key(ordered), layers=ordered, modules=modules, parts=tuple(parts))


def _check_pair(
    layer_id: str,
    module: str,
    a: np.ndarray,
    b: np.ndarray,
    existing: tuple[list[np.ndarray], list[np.ndarray]] | None,
) -> None:
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(
            f"stack: layer {layer_id!r}, {module}: expected A (r, in) and B (out, r), got {a.shape} and {b.shape}"
        )
    if existing is not None:
        in_features, out_features = existing[0][0].shape[1], existing[1][0].shape[0]
        if (a.shape[1], b.shape[0]) != (in_features, out_features):
            raise ValueError(
                f"stack: layer {layer_id!r}, {module}: expected (in, out) = ({in_features}, {out_features}) "
                f"like the layers before it, got ({a.shape[1]}, {b.shape[0]})"
            )


def _frozen(array: np.ndarray) -> np.ndarray:
    # Stacks are shared through a cache; a backend writing into one would corrupt every user.
    # A float32, contiguous, read-only array (an adapter's, from the cache) is kept as it is.
    if array.dtype == np.float32 and array.flags.c_contiguous and not array.flags.writeable:
        return array
    array = np.array(array, dtype=np.float32, order="C")
    array.flags.writeable = False
    return array
