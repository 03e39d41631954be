"""Rows with different LoRA stacks decoded together in one forward pass (torch backend).

**Per-row stacks, exactly.** For one projection, let U be the union of the layers the
rows use, A_U = [A_l] (R_U, in) and B_U = [B_l] (out, R_U) concatenated along the rank
axis with each layer stored once, and G (rows, R_U) the gains: G[row, cols(l)] = w_l s_l
for the layers the row's stack holds, 0 elsewhere. Then for row i

    y_i = W x_i + B_U ((A_U x_i) * G_i) = W x_i + sum_{l in stack(i)} w_l s_l B_l (A_l x_i)

which is the row's own stack (`inference.lora.stack`), so the base GEMM runs once for the
batch and mixed ranks need no padding. U, A_U, B_U and G change only when a row joins or
leaves; a row holds its `LoraStack` (immutable) from admission to its end, so its gains
never change under it.

**The KV cache of a changing batch.** Rows are left-padded to the longest one and carry
explicit positions: row i's new token sits at position len_i whatever the padding, and
an attention mask hides the pad columns (sdpa). A joining row is prefilled alone, in
chunks, on the one-request path (with its stack's prompt-prefix reuse), then its cache is
padded and concatenated into the batch's; a leaving row is dropped with
`batch_select_indices` and the pad columns no row needs any more are trimmed. A batch of
one row has no padding and runs exactly the one-request path.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.backends.torch import sample_token
from inference.guards import Guard
from inference.lora.stack import LoraStack, StackPart
from inference.lora.union import ConvertedLayers, plan_union

if TYPE_CHECKING:
    from inference.backends.torch import TorchBackend


@dataclass(eq=False)
class TorchRow:
    """One request in the batch: its prompt, frozen stack, own generator and guard."""

    ids: list[int]
    stack: LoraStack | None
    sampling: Sampling
    guard: Guard
    generator: torch.Generator
    cache: object = None  # its own cache while the prompt is prefilled, then None
    prefilled: int = 0  # prompt tokens in `cache`
    length: int = 0  # real tokens in the batch cache once joined
    next_token: int = -1  # fed at the next decode step
    joined: bool = False

    @property
    def prompt_tokens(self) -> int:
        return len(self.ids)

    @property
    def prompt_left(self) -> int:
        return len(self.ids) - self.prefilled


@dataclass(frozen=True, eq=False)
class Union:
    """The active rows' layers per projection: A_U, B_U and the rows' gains G (rows, 1, R_U)."""

    modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
    layers: tuple[str, ...]

    @property
    def rank(self) -> int:
        return max((a.shape[0] for a, _, _ in self.modules.values()), default=0)


class TorchBatch:
    """The engine thread's batch on a `TorchBackend`: open rows, prefill them, decode them together."""

    def __init__(self, backend: TorchBackend, *, prefill_chunk: int = 256) -> None:
        if prefill_chunk < 1:
            raise ValueError(f"prefill_chunk: expected at least 1, got {prefill_chunk}")
        self.backend = backend
        self.prefill_chunk = prefill_chunk
        self.rows: list[TorchRow] = []  # joined rows, in the cache's batch order
        self.union: Union | None = None
        self.rebuilds = 0
        self._cache: object = None
        self._mask: torch.Tensor | None = None  # (rows, padded length): 1 real, 0 pad
        self._layers: ConvertedLayers[tuple[torch.Tensor, torch.Tensor]] = ConvertedLayers(self._convert)

    # --- rows ---------------------------------------------------------------------------

    def open(self, messages: Sequence[ChatMessage], stack: LoraStack | None, sampling: Sampling) -> TorchRow | Finish:
        """A row for the request, or its Finish when it cannot run (too long for the context).

        A stack that does not fit the model raises `StackMismatch` here, before anything runs.
        """
        return self.open_ids(self.backend.encode_chat(messages), stack, sampling)

    def open_ids(self, ids: list[int], stack: LoraStack | None, sampling: Sampling) -> TorchRow | Finish:
        backend = self.backend
        if stack is not None:
            backend.check_stack(stack)
        guard = backend.guard(sampling, len(ids))
        if (overflow := guard.over_context(backend.context)) is not None:
            return overflow
        return TorchRow(list(ids), stack, sampling, guard, backend.generator(sampling.seed))

    @property
    def padded_length(self) -> int:
        return 0 if self._mask is None else int(self._mask.shape[1])

    def kv_tokens(self, joining: Sequence[int] = ()) -> int:
        """Rows x padded length of the batch, were rows of these lengths to join it."""
        rows = len(self.rows) + len(joining)
        return rows * max([self.padded_length, *joining])

    @property
    def union_rank(self) -> int:
        return self.union.rank if self.union is not None else 0

    def prefill(self, row: TorchRow, limit: int | None = None) -> torch.Tensor | None:
        """Run the next chunk of `row`'s prompt (at most `limit` tokens, or `prefill_chunk`);
        when the prompt is done, join the row and return the logits for its first token."""
        backend = self.backend
        key = row.stack.key if row.stack is not None else None
        if row.cache is None:
            from transformers import DynamicCache

            row.cache = DynamicCache(config=backend.config)
            row.prefilled = backend.prompt_cache.restore(key, row.ids, row.cache)
        chunk = row.ids[row.prefilled : row.prefilled + max(1, limit or self.prefill_chunk)]
        with backend.lock:
            backend.activate_locked(row.stack)
            logits = backend.step(torch.tensor([chunk], device=backend.device), row.cache)
        row.prefilled += len(chunk)
        if row.prefilled < len(row.ids):
            return None
        backend.prompt_cache.store(key, row.ids, row.cache)
        self._join(row)
        return logits

    def forward(self) -> dict[TorchRow, torch.Tensor]:
        """One decode step for every joined row, feeding each its `next_token`: its logits."""
        backend = self.backend
        rows = self.rows
        inputs = torch.tensor([[row.next_token] for row in rows], device=backend.device)
        assert self._mask is not None
        self._mask = torch.cat([self._mask, self._mask.new_ones((len(rows), 1))], dim=1)
        with backend.lock:
            if len(rows) == 1:
                # No padding to mask: the one-request path, bit for bit.
                backend.activate_locked(rows[0].stack)
                logits = backend.step(inputs, self._cache)[None]
            else:
                assert self.union is not None
                backend.activate_union_locked(self.union)
                positions = torch.tensor([[row.length] for row in rows], device=backend.device)
                logits = backend.step_batch(inputs, self._mask, positions, self._cache)
        for row in rows:
            row.length += 1
        return dict(zip(rows, logits, strict=True))

    def sample(self, row: TorchRow, logits: torch.Tensor) -> list[Token | Finish]:
        """Sample `row`'s next token with its own generator; the events it gives."""
        if not bool(torch.isfinite(logits).all()):
            return [row.guard.nonfinite()]
        row.next_token = sample_token(logits, row.sampling, row.generator)
        return row.guard.events(row.next_token)

    def remove(self, row: TorchRow) -> None:
        """Drop `row` (finished, cancelled or timed out) from the batch, or forget it unjoined."""
        row.cache = None
        if not row.joined:
            return
        row.joined = False
        index = self.rows.index(row)
        del self.rows[index]
        if not self.rows:
            self._cache = self._mask = self.union = None
            return
        keep = [i for i in range(len(self.rows) + 1) if i != index]
        indices = torch.tensor(keep, device=self.backend.device)
        self._cache.batch_select_indices(indices)  # type: ignore[attr-defined]
        assert self._mask is not None
        self._mask = self._mask[indices]
        # Columns that are padding in every row left are dead weight in every step.
        first = int(self._mask.any(dim=0).nonzero()[0])
        if first:
            self._mask = self._mask[:, first:]
            for layer in self._cache.layers:  # type: ignore[attr-defined]
                layer.keys, layer.values = layer.keys[..., first:, :], layer.values[..., first:, :]
        self._rebuild()

    # --- joining --------------------------------------------------------------------------

    def _join(self, row: TorchRow) -> None:
        cache, row.cache = row.cache, None
        row.length = len(row.ids)
        row.joined = True
        mask = torch.ones((1, row.length), dtype=torch.long, device=self.backend.device)
        if not self.rows:
            self._cache, self._mask = cache, mask
        else:
            assert self._mask is not None
            width = max(self.padded_length, row.length)
            batch_pad, row_pad = width - self.padded_length, width - row.length
            for ours, theirs in zip(self._cache.layers, cache.layers, strict=True):  # type: ignore[attr-defined]
                ours.keys = torch.cat([_pad_left(ours.keys, batch_pad), _pad_left(theirs.keys, row_pad)])
                ours.values = torch.cat([_pad_left(ours.values, batch_pad), _pad_left(theirs.values, row_pad)])
            self._mask = torch.cat([_pad_left(self._mask, batch_pad), _pad_left(mask, row_pad)])
        self.rows.append(row)
        self._rebuild()

    def _rebuild(self) -> None:
        """U, A_U, B_U and G for the rows as they are now."""
        self.rebuilds += 1
        plan = plan_union([row.stack for row in self.rows])
        modules: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for name, (layer_ids, gains) in plan.modules.items():
            factors = [self._layers.get(plan.parts[layer_id])[name] for layer_id in layer_ids]
            modules[name] = (
                torch.cat([a for a, _ in factors]),
                torch.cat([b for _, b in factors], dim=1),
                torch.from_numpy(gains).to(self.backend.device, self.backend.dtype)[:, None, :],
            )
        self.union = Union(modules, tuple(plan.parts))

    def _convert(self, part: StackPart) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        backend = self.backend
        return {
            name: (
                torch.tensor(a, device=backend.device, dtype=backend.dtype),
                torch.tensor(b, device=backend.device, dtype=backend.dtype),
            )
            for name, (a, b) in part.modules.items()
        }


def _pad_left(tensor: torch.Tensor, width: int) -> torch.Tensor:
    """`tensor` with `width` zero columns before its sequence axis (-2 for K/V, -1 for a mask)."""
    if width == 0:
        return tensor
    axis = -1 if tensor.dim() == 2 else -2
    shape = list(tensor.shape)
    shape[axis] = width
    return torch.cat([tensor.new_zeros(shape), tensor], dim=axis)
