"""Rows with different LoRA stacks decoded together in one forward pass (mlx backend).

The same per-row formulation as the torch backend (`inference.backends.torch_batch`): for
each projection the union U of the rows' layers, each stored once, as A_U^T (in, R_U) and
B_U^T (R_U, out), and the rows' gains G (rows, 1, R_U), so row i gets

    y_i = W x_i + ((x_i A_U^T) * G_i) B_U^T = W x_i + sum_{l in stack(i)} w_l s_l B_l A_l x_i.

The KV cache is mlx-lm's own `BatchKVCache` (left padding, per-row RoPE offsets and the
mask that hides the padding): a joining row, prefilled alone in chunks with its stack's
prompt-prefix reuse, is merged in with `merge` and `extend`; a leaving row is dropped with
`filter`, which also trims the padding no row needs. Each row samples with its own key.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import BatchKVCache

from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.guards import Guard
from inference.lora.stack import LoraStack, StackPart

if TYPE_CHECKING:
    from inference.backends.mlx import Factors, MlxBackend

_LAYER_CACHE = 64  # layers kept as mx arrays for the union, least recently used dropped


@dataclass(eq=False)
class MlxRow:
    ids: list[int]
    stack: LoraStack | None
    factors: Factors
    guard: Guard
    sampler: Callable[[mx.array], mx.array]
    cache: list[Any] | None = None  # its own KV cache while the prompt is prefilled
    rest: list[int] | None = None  # prompt ids not in `cache` yet
    next_token: int = -1
    joined: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def prompt_left(self) -> int:
        return len(self.ids) if self.rest is None else len(self.rest)


class MlxBatch:
    """The engine thread's batch on an `MlxBackend`."""

    def __init__(self, backend: MlxBackend, *, prefill_chunk: int = 256) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: expected at least 1, got {prefill_chunk}")
        self.backend = backend
        self.prefill_chunk = prefill_chunk
        self.rows: list[MlxRow] = []
        self.rebuilds = 0
        self._cache: list[BatchKVCache] | None = None
        self._union: dict[str, tuple[mx.array, mx.array, mx.array]] = {}
        self._layers: OrderedDict[str, tuple[StackPart, dict[str, tuple[mx.array, mx.array]]]] = OrderedDict()

    @property
    def union_rank(self) -> int:
        return max((a_t.shape[1] for a_t, _, _ in self._union.values()), default=0)

    def open(self, messages: Sequence[ChatMessage], stack: LoraStack | None, sampling: Sampling) -> MlxRow | Finish:
        return self.open_ids(self.backend.encode_chat(messages), stack, sampling)

    def open_ids(self, ids: list[int], stack: LoraStack | None, sampling: Sampling) -> MlxRow | Finish:
        backend = self.backend
        factors = backend.stack_factors(stack)  # StackMismatch here, before anything runs
        guard = backend.guard(sampling, len(ids))
        if (overflow := guard.over_context(backend.context)) is not None:
            return overflow
        return MlxRow(list(ids), stack, factors, guard, backend.sampler(sampling))

    def kv_tokens(self, joining: Sequence[int] = ()) -> int:
        width = self._cache[0].size() if self._cache else 0
        return (len(self.rows) + len(joining)) * max([width, *joining])

    def prefill(self, row: MlxRow, limit: int | None = None) -> mx.array | None:
        backend = self.backend
        key = backend.prompt_key(row.stack)
        if row.cache is None:
            row.cache, row.rest = backend.restore(key, row.ids)
        assert row.rest is not None
        count = max(1, limit or self.prefill_chunk)
        chunk, row.rest = row.rest[:count], row.rest[count:]
        with backend.lock:
            backend.activate_factors(row.factors)
            logits = backend.model(mx.array([chunk]), cache=row.cache)[0, -1]
            mx.eval(logits, [c.state for c in row.cache])
        if row.rest:
            return None
        backend.store(key, row.ids, row.cache)
        self._join(row)
        return logits.astype(mx.float32)

    def forward(self) -> dict[MlxRow, mx.array]:
        backend = self.backend
        inputs = mx.array([[row.next_token] for row in self.rows])
        with backend.lock:
            backend.activate_factors(self._union)
            logits = backend.model(inputs, cache=self._cache)[:, -1].astype(mx.float32)
            mx.eval(logits)
        return {row: logits[index] for index, row in enumerate(self.rows)}

    def sample(self, row: MlxRow, logits: mx.array) -> list[Token | Finish]:
        logprobs = logits - mx.logsumexp(logits, keepdims=True)
        token_id = int(row.sampler(logprobs).item())
        if token_id < 0:  # the sampler's mark for NaN or Inf
            return [row.guard.nonfinite()]
        row.next_token = token_id
        tokens, finish = row.guard.push(token_id)
        return [*tokens, finish] if finish is not None else list(tokens)

    def remove(self, row: MlxRow) -> None:
        row.cache = None
        if not row.joined:
            return
        row.joined = False
        index = self.rows.index(row)
        del self.rows[index]
        if not self.rows:
            self._cache, self._union = None, {}
            return
        assert self._cache is not None
        keep = mx.array([i for i in range(len(self.rows) + 1) if i != index])
        for layer in self._cache:
            layer.filter(keep)  # also trims the left padding nobody needs any more
        self._rebuild()

    def _join(self, row: MlxRow) -> None:
        assert row.cache is not None
        merged = [BatchKVCache.merge([layer]) for layer in row.cache]
        row.cache, row.rest = None, []
        row.joined = True
        if self._cache is None:
            self._cache = merged
        else:
            for ours, theirs in zip(self._cache, merged, strict=True):
                ours.extend(theirs)
        self.rows.append(row)
        self._rebuild()

    def _rebuild(self) -> None:
        self.rebuilds += 1
        parts: dict[str, StackPart] = {}
        for row in self.rows:
            for part in row.stack.parts if row.stack is not None else ():
                parts.setdefault(part.layer_id, part)
        arrays = {layer_id: self._layer(part) for layer_id, part in parts.items()}
        dtype = self.backend.dtype
        union: dict[str, tuple[mx.array, mx.array, mx.array]] = {}
        for name in sorted({name for part in parts.values() for name in part.modules}):
            columns: dict[str, slice] = {}
            a_blocks, b_blocks = [], []
            start = 0
            for layer_id, factors in arrays.items():
                if name in factors:
                    a_t, b_t = factors[name]
                    columns[layer_id] = slice(start, start + a_t.shape[1])
                    start += a_t.shape[1]
                    a_blocks.append(a_t)
                    b_blocks.append(b_t)
            gains = np.zeros((len(self.rows), 1, start), dtype=np.float32)
            for index, row in enumerate(self.rows):
                for part in row.stack.parts if row.stack is not None else ():
                    if part.layer_id in columns:
                        gains[index, 0, columns[part.layer_id]] = part.gain
            union[name] = (mx.concatenate(a_blocks, axis=1), mx.concatenate(b_blocks, axis=0), mx.array(gains).astype(dtype))
        mx.eval(union)
        self._union = union

    def _layer(self, part: StackPart) -> dict[str, tuple[mx.array, mx.array]]:
        found = self._layers.get(part.layer_id)
        if found is not None and all(found[0].modules.get(name, (None,))[0] is a for name, (a, _) in part.modules.items()):
            self._layers.move_to_end(part.layer_id)
            return found[1]
        dtype = self.backend.dtype
        factors = {name: (mx.array(a.T).astype(dtype), mx.array(b.T).astype(dtype)) for name, (a, b) in part.modules.items()}
        self._layers[part.layer_id] = (part, factors)
        if len(self._layers) > _LAYER_CACHE:
            self._layers.popitem(last=False)
        return factors
