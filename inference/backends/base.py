"""The one protocol every backend follows, and the types that cross it.

A backend streams tokens for a chat with an optional LoRA stack. It is synchronous: the
engine runs `generate` in a worker thread and stops it through `cancelled`. Local backends
(torch, mlx) also expose one forward pass as `logits`, which the exactness tests compare.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Literal, Protocol, runtime_checkable

import msgspec
import numpy as np

from inference.lora.stack import LoraStack

if TYPE_CHECKING:
    from inference.guards import Guard

Role = Literal["system", "user", "assistant"]
FinishReason = Literal["stop", "length", "repetition", "error", "cancelled"]


class ChatMessage(msgspec.Struct, frozen=True):
    role: Role
    content: str


# Below this a temperature runs greedy: dividing float32 logits by a smaller one may overflow to
# inf (NaN probabilities), and sampling at it already picks the top token but for gaps under 1e-4.
GREEDY_BELOW = 1e-6


class Sampling(msgspec.Struct, frozen=True, kw_only=True):
    temperature: float = 0.0  # 0 (or anything below GREEDY_BELOW) = greedy
    top_p: float = 1.0
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None
    # Local backends only: generate max_tokens whatever the model says (benchmarks need equal lengths).
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not 0.0 <= self.temperature <= 100.0:
            raise ValueError(f"temperature: expected a number in [0, 100], got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p: expected a number in (0, 1], got {self.top_p}")
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected at least 1, got {self.max_tokens}")
        if any(not stop for stop in self.stop):
            raise ValueError(f"stop: expected non-empty strings, got {list(self.stop)}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW


class Token(msgspec.Struct, frozen=True):
    text: str
    token_id: int


class Finish(msgspec.Struct, frozen=True):
    reason: FinishReason
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    rule: str | None = None  # why it failed, as the refusal rule the API answers with
    worker_pid: int | None = None  # the inference daemon's worker process that generated it


Event = Token | Finish


def never_cancelled() -> bool:
    return False


class StackMismatch(ValueError):
    """A LoRA stack whose modules or shapes do not fit the loaded model."""


@runtime_checkable
class Backend(Protocol):
    name: str

    def generate(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        cancelled: Callable[[], bool] = never_cancelled,
    ) -> Iterator[Token | Finish]:
        """Yield Tokens, then exactly one Finish; check `cancelled()` between tokens."""
        ...

    @property
    def loads(self) -> int:
        """How many times this backend has loaded the base model."""
        ...


class BatchRow(Protocol):
    """One request in a `DecodeBatch`."""

    guard: Guard  # turns its sampled ids into Tokens and its one Finish

    @property
    def prompt_tokens(self) -> int: ...

    @property
    def prompt_left(self) -> int:
        """Prompt tokens not run yet (an upper bound before the prefix cache is looked up)."""
        ...


class DecodeBatch(Protocol):
    """Rows decoded together by one forward pass per step; only the engine's thread calls it."""

    rebuilds: int  # how often the rows' union of layers was rebuilt

    @property
    def rows(self) -> Sequence[BatchRow]:
        """The joined rows: those `forward` decodes."""
        ...

    @property
    def union_rank(self) -> int: ...

    def open(self, messages: Sequence[ChatMessage], stack: LoraStack | None, sampling: Sampling) -> BatchRow | Finish:
        """A row for the request, or its Finish if it cannot run; a misfit stack raises `StackMismatch`."""
        ...

    def kv_tokens(self, joining: Sequence[int] = ()) -> int:
        """Rows x padded length, were rows with these prompt lengths to join."""
        ...

    def prefill(self, row: BatchRow, limit: int) -> object | None:
        """Run up to `limit` more prompt tokens; at the prompt's end join the row and return its logits."""
        ...

    def forward(self) -> Mapping[BatchRow, object]:
        """One decode step of every joined row: each row's logits."""
        ...

    def sample(self, row: BatchRow, logits: object) -> list[Token | Finish]:
        """The row's next token drawn with its own generator, as the events it gives."""
        ...

    def remove(self, row: BatchRow) -> None:
        """Drop a row that ended (or never joined)."""
        ...


@runtime_checkable
class BatchingBackend(Backend, Protocol):
    """A backend whose engine runs many requests in one forward pass (continuous batching)."""

    def batch(self, *, prefill_chunk: int) -> DecodeBatch: ...


@runtime_checkable
class LocalBackend(Backend, Protocol):
    """A backend that holds the weights in this process, so one forward pass can be inspected."""

    def logits(self, token_ids: Sequence[int], stack: LoraStack | None) -> np.ndarray:
        """(len(token_ids), vocab) float32 logits of one forward pass over `token_ids`."""
        ...
