"""The engine: the one owner of a backend's model in a process.

Requests wait in a bounded priority queue (higher priority first, then first come) and
their tokens go back to each caller's event loop as they come. A caller that stops reading
(a dropped client) or runs past its timeout flips the request's cancel flag; the engine
drops it before the next step, so the model moves on at once.

How requests meet the model depends on the backend:

- **Batching** (torch, mlx): one scheduler thread runs an iteration-level loop, as Orca and
  vLLM do. Between decode steps it admits queued requests while the batch has fewer than
  `max_batch` rows and its KV cache (rows x padded length) stays within `max_batch_tokens`
  (an empty batch takes any request: a long prompt runs alone rather than never), prefills
  them at most `prefill_chunk` prompt tokens per iteration so the rows already decoding
  never stall for a whole long prompt, then runs ONE forward pass for every joined row,
  each with its own stack, sampling parameters and generator. Rows that end, are
  cancelled or time out leave before the next step; nobody is pre-empted.
- **Concurrent** (any other backend, e.g. an OpenAI-compatible server that batches on its
  side): up to `concurrency` requests run at once, each on its own thread through
  `Backend.generate`.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import msgspec
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference.backends.base import Backend, BatchingBackend, BatchRow, ChatMessage, DecodeBatch, Finish, Sampling, Token
from inference.lora.stack import LoraStack

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)
_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_CLOSED = "engine closed"
MAX_LABELS = 1024  # labels kept in `label_stats()`, least recently used dropped


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; the caller should retry later."""


class EngineClosed(RuntimeError):
    """The engine is not running (never started, or closed)."""


@dataclass(eq=False)
class _Request:
    messages: Sequence[ChatMessage]
    stack: LoraStack | None
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    label: str | None
    events: asyncio.Queue[Token | Finish] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    started: float = 0.0
    timed_out: bool = False  # its Finish was already counted, as the timeout's error

    def deliver(self, events: Iterable[Token | Finish]) -> None:
        """Hand events to the caller's loop (from any thread), one wake-up for all of them."""
        events = list(events)
        if not events:
            return
        try:
            self.loop.call_soon_threadsafe(_put_all, self.events, events)
        except RuntimeError:  # its loop has closed: nobody is reading any more
            self.cancel.set()


def _put_all(queue: asyncio.Queue[Token | Finish], events: list[Token | Finish]) -> None:
    for event in events:
        queue.put_nowait(event)


@dataclass(order=True)
class _Job:
    rank: tuple[int, int]  # (-priority, arrival): higher priority first, then first come
    request: _Request = field(compare=False)


@dataclass(eq=False)
class _Slot:
    """An admitted request and its row in the batch."""

    request: _Request
    row: BatchRow


@dataclass
class _LabelStats:
    admitted: int = 0
    requests: int = 0  # finished
    completion_tokens: int = 0
    queue_wait_seconds: float = 0.0
    errors: int = 0


class LabelStats(msgspec.Struct, frozen=True):
    label: str
    requests: int  # finished
    completion_tokens: int
    errors: int
    mean_queue_wait_ms: float


class EngineStats(msgspec.Struct, frozen=True, kw_only=True):
    """What the engine has done: for an operator's JSON view (Prometheus has the same totals)."""

    backend: str
    mode: Literal["batching", "concurrent"]
    max_batch: int  # rows per decode step (batching) or requests at once (concurrent)
    max_batch_tokens: int
    queue_depth: int
    active_requests: int
    batch_size: int  # rows decoding now
    decode_steps: int
    mean_step_batch_size: float
    max_step_batch_size: int
    union_rank: int
    union_rebuilds: int


class EngineMetrics:
    """Per-engine Prometheus metrics on their own registry (no process-wide globals)."""

    def __init__(self, queue_depth: Callable[[], int], stack_hit_rate: Callable[[], float] | None) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        Gauge("genome_inference_queue_depth", "Requests waiting for the model.", registry=r).set_function(queue_depth)
        self.active = Gauge("genome_inference_active_requests", "Requests being generated.", registry=r)
        self.ttft = Histogram(
            "genome_inference_time_to_first_token_seconds", "From submission to the first token.",
            buckets=_TTFT_BUCKETS, registry=r,
        )  # fmt: skip
        self.rate = Histogram(
            "genome_inference_tokens_per_second", "Decode rate of each finished request.",
            buckets=_RATE_BUCKETS, registry=r,
        )  # fmt: skip
        self.tokens = Counter("genome_inference_completion_tokens", "Tokens generated.", registry=r)
        self.finished = Counter("genome_inference_requests", "Finished requests by reason.", ["reason"], registry=r)
        self.rejected = Counter("genome_inference_rejected_requests", "Requests refused: queue full.", registry=r)
        self.queue_wait = Histogram(
            "genome_inference_queue_wait_seconds", "From submission to admission to the model.",
            buckets=_WAIT_BUCKETS, registry=r,
        )  # fmt: skip
        self.batch_size = Gauge("genome_inference_batch_size", "Rows decoding together now.", registry=r)
        self.step_batch_size = Histogram(
            "genome_inference_step_batch_size", "Rows in each decode step.",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 64), registry=r,
        )  # fmt: skip
        self.union_rebuilds = Counter(
            "genome_inference_union_rebuilds", "Rebuilds of the batch's union of LoRA layers (a row joined or left).",
            registry=r,
        )  # fmt: skip
        self.union_rank = Gauge("genome_inference_union_rank", "Rank of the batch's union of LoRA layers.", registry=r)
        if stack_hit_rate is not None:
            Gauge(
                "genome_inference_stack_cache_hit_ratio", "Assembled-stack cache hits / lookups.", registry=r
            ).set_function(stack_hit_rate)


class Engine:
    """Owns `backend`; `stream` yields a request's Tokens and then its one Finish."""

    def __init__(
        self,
        backend: Backend,
        *,
        max_queue: int = 64,
        timeout: float = 300.0,
        stack_hit_rate: Callable[[], float] | None = None,
        max_batch: int = 8,
        max_batch_tokens: int = 16_384,
        prefill_chunk: int = 256,
        concurrency: int = 1,
    ) -> None:
        if max_queue < 1 or not timeout > 0:
            raise ValueError(f"engine: expected max_queue >= 1 and timeout > 0, got {max_queue} and {timeout}")
        if min(max_batch, max_batch_tokens, prefill_chunk, concurrency) < 1:
            raise ValueError(
                "engine: expected max_batch, max_batch_tokens, prefill_chunk and concurrency >= 1, got "
                f"{max_batch}, {max_batch_tokens}, {prefill_chunk} and {concurrency}"
            )
        self.backend = backend
        self.max_queue = max_queue
        self.timeout = timeout
        self.max_batch = max_batch
        self.max_batch_tokens = max_batch_tokens
        self.prefill_chunk = prefill_chunk
        self.batching = isinstance(backend, BatchingBackend)
        self.concurrency = 1 if self.batching else concurrency
        self._waiting: list[_Job] = []  # a heap
        self._wake = threading.Condition()
        self._arrivals = itertools.count()
        self._threads: list[threading.Thread] = []
        self._closing = False
        self._running: set[_Request] = set()
        self._labels: OrderedDict[str, _LabelStats] = OrderedDict()
        self._figures = _Figures()
        self.metrics = EngineMetrics(self._queue_depth, stack_hit_rate)

    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._threads:
            return
        self._closing = False
        target = self._schedule if self.batching else self._serve
        name = f"engine-{self.backend.name}"
        self._threads = [threading.Thread(target=target, name=f"{name}-{i}", daemon=True) for i in range(self.concurrency)]
        for thread in self._threads:
            thread.start()

    async def close(self) -> None:
        """Cancel what runs and what waits, and stop the engine's threads."""
        threads, self._threads = self._threads, []
        if not threads:
            return
        with self._wake:
            self._closing = True
            waiting, self._waiting = self._waiting, []
            for request in self._running:
                request.cancel.set()
            self._wake.notify_all()
        for job in waiting:
            job.request.cancel.set()
            job.request.deliver([Finish("cancelled", 0, 0, _CLOSED)])
        for thread in threads:
            await asyncio.to_thread(thread.join)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        *,
        priority: int = 0,
        timeout: float | None = None,
        label: str | None = None,
    ) -> AsyncIterator[Token | Finish]:
        """Queue the request now (raising `QueueFull` when full); iterate for Tokens then one Finish.

        Higher `priority` runs first, then first come. Stop iterating (or `aclose()`) to cancel.
        `label` (e.g. a persona id) groups the request's figures in `stats()`.
        """
        if not self._threads:
            raise EngineClosed("the inference engine is not running: start it first")
        request = _Request(messages, stack, sampling, asyncio.get_running_loop(), label)
        with self._wake:
            if len(self._waiting) >= self.max_queue:
                self.metrics.rejected.inc()
                raise QueueFull(f"the inference queue is full ({self.max_queue} requests waiting): retry later")
            heapq.heappush(self._waiting, _Job((-priority, next(self._arrivals)), request))
            self._wake.notify()
        limit = self.timeout if timeout is None else timeout
        return self._events(request, limit, request.loop.time() + limit)

    async def _events(self, request: _Request, limit: float, deadline: float) -> AsyncIterator[Token | Finish]:
        first = True
        try:
            while True:
                # Not `asyncio.wait_for`: on Python 3.11 a cancel landing after the queue handed
                # it a token returned the token and lost the cancel (the answer ran to its end).
                try:
                    async with asyncio.timeout_at(deadline):
                        event = await request.events.get()
                except TimeoutError:
                    request.timed_out = True
                    request.cancel.set()
                    yield self._timed_out(limit)
                    return
                if first and isinstance(event, Token):
                    self.metrics.ttft.observe(time.perf_counter() - request.submitted)
                    first = False
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            # Reached on a normal end too, where it changes nothing; on a caller that went
            # away (generator closed or task cancelled) it stops the generation.
            request.cancel.set()

    async def complete(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        *,
        priority: int = 0,
        timeout: float | None = None,
        label: str | None = None,
    ) -> tuple[str, Finish]:
        """The whole answer at once, and how it ended."""
        parts: list[str] = []
        async for event in self.stream(messages, stack, sampling, priority=priority, timeout=timeout, label=label):
            if isinstance(event, Finish):
                return "".join(parts), event
            parts.append(event.text)
        raise AssertionError("unreachable: stream always ends with a Finish")

    def label_stats(self) -> list[LabelStats]:
        """What the requests of each label (the most recent `MAX_LABELS`) got, by label."""
        with self._wake:
            labels = [
                LabelStats(label, stats.requests, stats.completion_tokens, stats.errors,
                           1000 * stats.queue_wait_seconds / stats.admitted if stats.admitted else 0.0)
                for label, stats in self._labels.items()
            ]  # fmt: skip
        return sorted(labels, key=lambda entry: entry.label)

    def stats(self) -> EngineStats:
        """The engine's figures: queue and batch."""
        with self._wake:
            figures = _Figures(**vars(self._figures))
            queued, running = len(self._waiting), len(self._running)
        return EngineStats(
            backend=self.backend.name,
            mode="batching" if self.batching else "concurrent",
            max_batch=self.max_batch if self.batching else self.concurrency,
            max_batch_tokens=self.max_batch_tokens,
            queue_depth=queued,
            active_requests=running,
            batch_size=figures.batch_size,
            decode_steps=figures.steps,
            mean_step_batch_size=figures.step_rows / figures.steps if figures.steps else 0.0,
            max_step_batch_size=figures.max_step_rows,
            union_rank=figures.union_rank,
            union_rebuilds=figures.union_rebuilds,
        )

    # --- admission ------------------------------------------------------------------------

    def _queue_depth(self) -> int:
        return len(self._waiting)

    def _take(self, block: bool) -> _Request | None:
        """The next live request (None when closing, or when none waits and `block` is off)."""
        with self._wake:
            while True:
                while self._waiting:
                    request = heapq.heappop(self._waiting).request
                    if not request.cancel.is_set():  # not timed out or abandoned while it waited
                        return self._started(request)
                if self._closing or not block:
                    return None
                self._wake.wait()

    def _started(self, request: _Request) -> _Request:
        # Called with the lock held.
        request.started = time.perf_counter()
        self._running.add(request)
        wait = request.started - request.submitted
        self.metrics.queue_wait.observe(wait)
        if request.label is not None:
            stats = self._label(request.label)
            stats.admitted += 1
            stats.queue_wait_seconds += wait
        return request

    def _label(self, label: str) -> _LabelStats:
        # Called with the lock held.
        stats = self._labels.get(label)
        if stats is None:
            stats = self._labels[label] = _LabelStats()
            if len(self._labels) > MAX_LABELS:
                self._labels.popitem(last=False)
        self._labels.move_to_end(label)
        return stats

    def _ended(self, request: _Request, finish: Finish) -> None:
        """Count a request's end (a timed-out one was counted as its timeout already)."""
        with self._wake:
            self._running.discard(request)
            if request.label is not None:
                stats = self._label(request.label)
                stats.requests += 1
                stats.completion_tokens += finish.completion_tokens
                stats.errors += finish.reason == "error"
        if request.timed_out:
            return
        self.metrics.finished.labels(finish.reason).inc()
        self.metrics.tokens.inc(finish.completion_tokens)
        seconds = time.perf_counter() - request.started
        if finish.completion_tokens and seconds > 0:
            self.metrics.rate.observe(finish.completion_tokens / seconds)

    def _timed_out(self, limit: float) -> Finish:
        finish = Finish("error", 0, 0, f"request timed out after {limit:g} s", rule="generation_timed_out")
        self.metrics.finished.labels("error").inc()
        return finish

    # --- concurrent: one thread per running request ----------------------------------------

    def _serve(self) -> None:
        while (request := self._take(block=True)) is not None:
            self.metrics.active.inc()
            try:
                self._generate(request)
            finally:
                self.metrics.active.dec()

    def _generate(self, request: _Request) -> None:
        finish: Finish | None = None
        try:
            for event in self.backend.generate(request.messages, request.stack, request.sampling, request.cancel.is_set):
                if isinstance(event, Finish):
                    finish = event
                else:
                    request.deliver([event])
        except Exception as exc:  # noqa: BLE001 - a backend failure ends this request, not the engine
            finish = _failed(exc)
        finish = finish or Finish("error", 0, 0, "the backend ended without a Finish")
        # Counted before it is delivered: a caller holding its answer sees it in the metrics.
        self._ended(request, finish)
        request.deliver([finish])

    # --- batching: one scheduler thread ----------------------------------------------------

    def _schedule(self) -> None:
        assert isinstance(self.backend, BatchingBackend)
        batch = self.backend.batch(prefill_chunk=self.prefill_chunk)
        rows = _Rows()
        while True:
            if rows.idle and (request := self._take(block=True)) is not None:
                self._open(batch, request, rows)
            if self._closing:
                break
            self._admit(batch, rows)
            self._drop_cancelled(batch, rows)
            try:
                self._prefill(batch, rows)
                if rows.joined:
                    self._decode(batch, rows)
            except Exception as exc:  # noqa: BLE001 - a failed step ends the batch's rows, not the engine
                for slot in rows.joined.values():
                    self._finish(batch, slot, _failed(exc))
                rows.joined.clear()
                batch = self.backend.batch(prefill_chunk=self.prefill_chunk)
                rows.rebuilds_seen = 0
            self._observe(batch, rows)
        for slot in rows.all():
            self._finish(batch, slot, Finish("cancelled", slot.row.prompt_tokens, slot.row.guard.completion_tokens, _CLOSED))
        self._observe(batch, rows)

    def _admit(self, batch: DecodeBatch, rows: _Rows) -> None:
        """Admit waiting requests in priority order while the batch has room for them.

        The head of the queue is opened (tokenised) to learn its length; if its KV tokens
        do not fit beside the rows running, it is held, and nobody overtakes it.
        """
        while rows.count < self.max_batch:
            if rows.held is None:
                if (request := self._take(block=False)) is None:
                    return
                self._open(batch, request, rows)
                continue
            lengths = [slot.row.prompt_tokens for slot in (*rows.prefilling, rows.held)]
            if rows.count and batch.kv_tokens(lengths) > self.max_batch_tokens:
                return  # an empty batch takes any request: a long prompt runs alone
            rows.prefilling.append(rows.held)
            rows.held = None

    def _open(self, batch: DecodeBatch, request: _Request, rows: _Rows) -> None:
        try:
            row = batch.open(request.messages, request.stack, request.sampling)
        except Exception as exc:  # noqa: BLE001 - a misfit stack or bad prompt ends this request only
            row = _failed(exc)
        if isinstance(row, Finish):
            self._ended(request, row)
            request.deliver([row])
        else:
            rows.held = _Slot(request, row)

    def _drop_cancelled(self, batch: DecodeBatch, rows: _Rows) -> None:
        if rows.held is not None and rows.held.request.cancel.is_set():
            slot, rows.held = rows.held, None
            self._finish(batch, slot, slot.row.guard.cancel())
        for slot in [s for s in rows.prefilling if s.request.cancel.is_set()]:
            rows.prefilling.remove(slot)
            self._finish(batch, slot, slot.row.guard.cancel())
        for row, slot in [(r, s) for r, s in rows.joined.items() if s.request.cancel.is_set()]:
            del rows.joined[row]
            self._finish(batch, slot, slot.row.guard.cancel())

    def _prefill(self, batch: DecodeBatch, rows: _Rows) -> None:
        """Up to `prefill_chunk` prompt tokens this iteration, oldest admission first."""
        budget = self.prefill_chunk
        while rows.prefilling and budget > 0:
            slot = rows.prefilling[0]
            limit = min(slot.row.prompt_left, budget)
            budget -= limit
            try:
                logits = batch.prefill(slot.row, limit)
            except Exception as exc:  # noqa: BLE001 - its prompt failed: that request only
                rows.prefilling.pop(0)
                self._finish(batch, slot, _failed(exc))
                continue
            if logits is None:
                continue
            rows.prefilling.pop(0)
            rows.joined[slot.row] = slot
            self._emit(batch, rows, slot, batch.sample(slot.row, logits))

    def _decode(self, batch: DecodeBatch, rows: _Rows) -> None:
        logits = batch.forward()
        with self._wake:
            self._figures.steps += 1
            self._figures.step_rows += len(logits)
            self._figures.max_step_rows = max(self._figures.max_step_rows, len(logits))
        self.metrics.step_batch_size.observe(len(logits))
        for row, row_logits in logits.items():
            self._emit(batch, rows, rows.joined[row], batch.sample(row, row_logits))

    def _emit(self, batch: DecodeBatch, rows: _Rows, slot: _Slot, events: list[Token | Finish]) -> None:
        finish = events[-1] if events and isinstance(events[-1], Finish) else None
        if finish is None:
            slot.request.deliver(events)
            return
        slot.request.deliver(events[:-1])
        rows.joined.pop(slot.row, None)
        self._finish(batch, slot, finish)

    def _finish(self, batch: DecodeBatch, slot: _Slot, finish: Finish) -> None:
        """End `slot`'s request with `finish` and take its row out of the batch."""
        try:
            batch.remove(slot.row)
        finally:
            self._ended(slot.request, finish)
            if not slot.request.timed_out:
                slot.request.deliver([finish])

    def _observe(self, batch: DecodeBatch, rows: _Rows) -> None:
        figures = self._figures
        figures.batch_size = len(batch.rows)
        figures.union_rank = batch.union_rank
        self.metrics.batch_size.set(figures.batch_size)
        self.metrics.active.set(rows.count)
        self.metrics.union_rank.set(figures.union_rank)
        if batch.rebuilds > rows.rebuilds_seen:
            self.metrics.union_rebuilds.inc(batch.rebuilds - rows.rebuilds_seen)
            figures.union_rebuilds += batch.rebuilds - rows.rebuilds_seen
            rows.rebuilds_seen = batch.rebuilds


@dataclass(eq=False)
class _Rows:
    """The scheduler's requests past the queue: held (opened, waiting for room), prefilling, joined."""

    held: _Slot | None = None
    prefilling: list[_Slot] = field(default_factory=list)
    joined: dict[BatchRow, _Slot] = field(default_factory=dict)
    rebuilds_seen: int = 0

    @property
    def count(self) -> int:
        """Rows admitted to the batch (prefilling or decoding)."""
        return len(self.prefilling) + len(self.joined)

    @property
    def idle(self) -> bool:
        return self.held is None and not self.count

    def all(self) -> list[_Slot]:
        return [*([self.held] if self.held is not None else []), *self.prefilling, *self.joined.values()]


@dataclass
class _Figures:
    """What `stats()` reports beyond the Prometheus metrics (written by the engine's threads)."""

    steps: int = 0
    step_rows: int = 0
    max_step_rows: int = 0
    batch_size: int = 0
    union_rank: int = 0
    union_rebuilds: int = 0


def _failed(exc: Exception) -> Finish:
    return Finish("error", 0, 0, f"{type(exc).__name__}: {exc}")
