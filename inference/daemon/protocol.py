"""Messages between the daemon and its model workers (msgpack over a `multiprocessing` pipe).

The daemon owns request ids. A worker answers each `Generate` with Tokens and exactly one
`Ended` (or one `Refused` before any token), and each `Figures` ask with one `FiguresReply`.
"""

from __future__ import annotations

from typing import Annotated

import msgspec

from inference.backends.base import ChatMessage


class StackEntry(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One layer of a request's LoRA stack: its adapter by content hash, its weight, and the
    scale its factors are applied at (None: the adapter's own alpha / r), so the layer adds
    weight * scale * B (A x)."""

    adapter_sha256: str
    weight: float = 1.0
    scale: Annotated[float, msgspec.Meta(gt=0.0)] | None = None


class Generate(msgspec.Struct, frozen=True, tag=True):
    id: int
    messages: list[ChatMessage]
    stack: list[StackEntry]
    temperature: float
    top_p: float
    max_tokens: int
    stop: list[str]
    seed: int | None
    ignore_eos: bool
    priority: int
    timeout: float
    label: str | None


class Cancel(msgspec.Struct, frozen=True, tag=True):
    id: int


class Figures(msgspec.Struct, frozen=True, tag=True):
    id: int


ToWorker = Generate | Cancel | Figures


class Ready(msgspec.Struct, frozen=True, tag=True):
    pid: int
    backend: str


class Failed(msgspec.Struct, frozen=True, tag=True):
    """The worker could not load its model; it exits after sending this."""

    detail: str


class TokenOut(msgspec.Struct, frozen=True, tag=True):
    id: int
    text: str
    token_id: int


class Tokens(msgspec.Struct, frozen=True, tag=True):
    """Tokens of several requests (or several of one) that came in one turn of the worker's loop."""

    items: list[TokenOut]


class Ended(msgspec.Struct, frozen=True, tag=True):
    id: int
    reason: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    rule: str | None = None


class Refused(msgspec.Struct, frozen=True, tag=True):
    """A request the worker will not run (a bad adapter, a full queue); sent instead of any token."""

    id: int
    status: int
    rule: str
    detail: str


class FiguresReply(msgspec.Struct, frozen=True, tag=True):
    id: int
    engine: bytes  # EngineStats as JSON
    labels: bytes  # list[LabelStats] as JSON
    metrics: str  # the engine's Prometheus text exposition


FromWorker = Ready | Failed | TokenOut | Tokens | Ended | Refused | FiguresReply

_to_worker = msgspec.msgpack.Decoder(ToWorker)
_from_worker = msgspec.msgpack.Decoder(FromWorker)
encode = msgspec.msgpack.Encoder().encode


def decode_to_worker(data: bytes) -> ToWorker:
    return _to_worker.decode(data)


def decode_from_worker(data: bytes) -> FromWorker:
    return _from_worker.decode(data)
