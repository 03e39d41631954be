"""The engine: the one owner of a backend's model in a process.

Requests wait in a bounded priority queue; one worker thread runs them one at a time
through `Backend.generate` and hands each token back to the caller's event loop. A
caller that stops reading (a dropped client) or runs past its timeout flips the request's
cancel flag, which the backend checks between tokens, so the model moves on at once.
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from inference.backends.base import Backend, ChatMessage, Finish, Sampling, Token
from inference.lora.stack import LoraStack

_TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
_RATE_BUCKETS = (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000)


class QueueFull(RuntimeError):
    """More requests are waiting than the engine accepts; the caller should retry later."""


class EngineClosed(RuntimeError):
    """The engine is not running (never started, or closed)."""


@dataclass
class _Request:
    messages: Sequence[ChatMessage]
    stack: LoraStack | None
    sampling: Sampling
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Token | Finish] = field(default_factory=asyncio.Queue)
    cancel: threading.Event = field(default_factory=threading.Event)
    submitted: float = field(default_factory=time.perf_counter)
    timed_out: bool = False  # its Finish was already counted, as the timeout's error


@dataclass(order=True)
class _Job:
    rank: tuple[int, int]  # (-priority, arrival): higher priority first, then first come
    request: _Request = field(compare=False)


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
    ) -> None:
        if max_queue < 1 or not timeout > 0:
            raise ValueError(f"engine: expected max_queue >= 1 and timeout > 0, got {max_queue} and {timeout}")
        self.backend = backend
        self.max_queue = max_queue
        self.timeout = timeout
        self._queue: asyncio.PriorityQueue[_Job] = asyncio.PriorityQueue()
        self._arrivals = itertools.count()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"engine-{backend.name}")
        self._worker: asyncio.Task[None] | None = None
        self._running: _Request | None = None
        self.metrics = EngineMetrics(self._queue.qsize, stack_hit_rate)

    async def __aenter__(self) -> Engine:
        self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def start(self) -> None:
        if self._worker is None:
            self._worker = asyncio.get_running_loop().create_task(self._work(), name="inference-engine")

    async def close(self) -> None:
        """Cancel what runs and what waits, and stop the worker."""
        worker, self._worker = self._worker, None
        if worker is None:
            return
        if self._running is not None:
            self._running.cancel.set()
        worker.cancel()
        while not self._queue.empty():
            self._finish_unstarted(self._queue.get_nowait().request, "engine closed")
        await asyncio.gather(worker, return_exceptions=True)
        await asyncio.get_running_loop().run_in_executor(None, self._executor.shutdown)

    def stream(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        *,
        priority: int = 0,
        timeout: float | None = None,
    ) -> AsyncIterator[Token | Finish]:
        """Queue the request now (raising `QueueFull` when full); iterate for Tokens then one Finish.

        Higher `priority` runs first, then first come. Stop iterating (or `aclose()`) to cancel.
        """
        if self._worker is None:
            raise EngineClosed("the inference engine is not running: start it first")
        if self._queue.qsize() >= self.max_queue:
            self.metrics.rejected.inc()
            raise QueueFull(f"the inference queue is full ({self.max_queue} requests waiting): retry later")
        request = _Request(messages, stack, sampling, asyncio.get_running_loop())
        self._queue.put_nowait(_Job((-priority, next(self._arrivals)), request))
        limit = self.timeout if timeout is None else timeout
        return self._events(request, limit, request.loop.time() + limit)

    async def _events(self, request: _Request, limit: float, deadline: float) -> AsyncIterator[Token | Finish]:
        first = True
        try:
            while True:
                try:
                    event = await asyncio.wait_for(request.events.get(), deadline - request.loop.time())
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
    ) -> tuple[str, Finish]:
        """The whole answer at once, and how it ended."""
        parts: list[str] = []
        async for event in self.stream(messages, stack, sampling, priority=priority, timeout=timeout):
            if isinstance(event, Finish):
                return "".join(parts), event
            parts.append(event.text)
        raise AssertionError("unreachable: stream always ends with a Finish")

    # --- the worker ---------------------------------------------------------------------

    async def _work(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            job = await self._queue.get()
            request = job.request
            if request.cancel.is_set():  # timed out or abandoned while it waited
                continue
            self._running = request
            self.metrics.active.inc()
            try:
                await loop.run_in_executor(self._executor, self._generate, request)
            finally:
                self.metrics.active.dec()
                self._running = None

    def _generate(self, request: _Request) -> None:
        """Runs in the worker thread: the only place the backend is called."""
        started = time.perf_counter()
        finish: Finish | None = None
        try:
            for event in self.backend.generate(request.messages, request.stack, request.sampling, request.cancel.is_set):
                request.loop.call_soon_threadsafe(request.events.put_nowait, event)
                if isinstance(event, Finish):
                    finish = event
        except Exception as exc:  # noqa: BLE001 - a backend failure ends this request, not the engine
            finish = Finish("error", 0, 0, f"{type(exc).__name__}: {exc}")
            request.loop.call_soon_threadsafe(request.events.put_nowait, finish)
        if finish is not None and not request.timed_out:
            self._record(finish, time.perf_counter() - started)

    def _record(self, finish: Finish, seconds: float) -> None:
        self.metrics.finished.labels(finish.reason).inc()
        self.metrics.tokens.inc(finish.completion_tokens)
        if finish.completion_tokens and seconds > 0:
            self.metrics.rate.observe(finish.completion_tokens / seconds)

    def _timed_out(self, limit: float) -> Finish:
        finish = Finish("error", 0, 0, f"request timed out after {limit:g} s")
        self.metrics.finished.labels("error").inc()
        return finish

    def _finish_unstarted(self, request: _Request, why: str) -> None:
        request.cancel.set()
        request.events.put_nowait(Finish("cancelled", 0, 0, why))
