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

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import mlx.core as mx
from mlx_lm.models.cache import BatchKVCache

from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.guards import Guard
from inference.lora.stack import LoraStack, StackPart
from inference.lora.union import ConvertedLayers, plan_union

if TYPE_CHECKING:
    from inference.backends.mlx import Factors, MlxBackend


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
        self._layers: ConvertedLayers[tuple[mx.array, mx.array]] = ConvertedLayers(self._convert)

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
        return row.guard.events(token_id)

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
        plan = plan_union([row.stack for row in self.rows])
        union: dict[str, tuple[mx.array, mx.array, mx.array]] = {}
        for name, (layer_ids, gains) in plan.modules.items():
            factors = [self._layers.get(plan.parts[layer_id])[name] for layer_id in layer_ids]
            union[name] = (
                mx.concatenate([a_t for a_t, _ in factors], axis=1),
                mx.concatenate([b_t for _, b_t in factors], axis=0),
                mx.array(gains[:, None, :]).astype(self.backend.dtype),
            )
        mx.eval(union)
        self._union = union

    def _convert(self, part: StackPart) -> dict[str, tuple[mx.array, mx.array]]:
        dtype = self.backend.dtype
        return {name: (mx.array(a.T).astype(dtype), mx.array(b.T).astype(dtype)) for name, (a, b) in part.modules.items()}
