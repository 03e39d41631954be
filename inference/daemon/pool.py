"""The daemon's model workers: started on demand within a memory budget, watched, restarted.

Each base model gets at most one worker process. Only the event loop's thread touches the
pool's state; a reader thread per worker turns pipe messages into loop callbacks, and a
writer thread per worker sends, so a stopped (SIGSTOP) worker with a full pipe never blocks
the loop.

- **Budget**: a model costs its declared weight bytes (`inference.models.declared_weight_bytes`).
  Starting one that does not fit stops least recently used idle models first; if the
  busy ones alone leave no room, or the model is bigger than the whole budget, the request
  is refused (`model_capacity`).
- **Crashes**: a worker's pipe closing is its death, whatever killed it. Its in-flight
  requests end at once with `model_crashed`; it restarts after a backoff that doubles with
  each crash in a row, and after `max_crashes` in a row it is `unhealthy` (requests are
  refused until `unhealthy_retry_s` has passed, then it gets one more start).
- **Starts**: a torch worker is forked from a forkserver that imported torch and transformers
  once (~5 s of the ~6 s a fresh interpreter took here), so a restart costs the model's load;
  the forkserver holds libtorch's code, never weights. Other backends (mlx: Metal is not
  fork-safe) start from a fresh interpreter.
- **Stuck work**: a request still running `stuck_grace_s` after its own timeout (the engine
  inside ends a late request by itself; one that does not is a stuck process) gets its
  worker killed, which fails it with `generation_timed_out` and its neighbours with
  `model_crashed`, and restarts the worker.
"""

from __future__ import annotations

import asyncio
import itertools
import multiprocessing
import os
import queue
import signal
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from typing import Literal

import msgspec

from inference.backends.base import Finish, Token
from inference.daemon import worker as worker_module
from inference.daemon.protocol import (
    Cancel,
    Ended,
    Failed,
    Figures,
    FiguresReply,
    Generate,
    Ready,
    Refused,
    TokenOut,
    Tokens,
    decode_from_worker,
    encode,
)
from inference.daemon.worker import WorkerConfig

# What every torch worker imports before it loads a model; the architecture's own module
# (e.g. modeling_llama) is small and loads with the model.
TORCH_PRELOAD = [
    "inference.daemon.worker", "inference.backends.torch", "inference.backends.torch_batch",
    "transformers.modeling_utils", "transformers.generation", "transformers.models.auto.modeling_auto",
    "transformers.models.auto.tokenization_auto",
]
State = Literal["stopped", "starting", "ready", "backoff", "unhealthy"]
FIGURES_TIMEOUT_S = 2.0
STOP_TIMEOUT_S = 10.0


class ModelRefused(Exception):
    """A request the pool will not run; `status` and `rule` are its HTTP answer."""

    def __init__(self, status: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.rule = rule


class PoolSettings(msgspec.Struct, frozen=True, kw_only=True):
    memory_bytes: int
    restart_backoff_s: float = 1.0
    max_restart_backoff_s: float = 30.0
    max_crashes: int = 3
    unhealthy_retry_s: float = 60.0
    stuck_grace_s: float = 5.0
    start_timeout_s: float = 300.0


class ModelSource(msgspec.Struct, frozen=True):
    """What the pool needs to start a model: its worker's configuration and what it costs."""

    config: WorkerConfig
    declared_bytes: int


class ModelStatus(msgspec.Struct, frozen=True, kw_only=True):
    model: str
    state: State
    pid: int | None
    declared_bytes: int
    in_flight: int
    restarts: int
    crashes_in_a_row: int
    last_error: str | None


class Served(msgspec.Struct, frozen=True):
    """A request's worker process, known once it is routed."""

    pid: int


@dataclass(eq=False)
class _Flight:
    id: int
    events: asyncio.Queue[Token | Finish | Refused]
    deadline: float  # loop time after which the worker counts as stuck
    timed_out: bool = False


@dataclass(eq=False)
class _Worker:
    model: str
    source: ModelSource
    state: State = "stopped"
    process: multiprocessing.process.BaseProcess | None = None
    outbox: queue.SimpleQueue[bytes | None] = field(default_factory=queue.SimpleQueue)
    pid: int | None = None
    ready: asyncio.Future[None] | None = None
    flights: dict[int, _Flight] = field(default_factory=dict)
    figures: dict[int, asyncio.Future[FiguresReply]] = field(default_factory=dict)
    last_used: float = 0.0
    restarts: int = 0
    crashes: int = 0  # in a row: a finished request resets it
    unhealthy_since: float = 0.0
    stopping: bool = False  # stopped on purpose: its exit is not a crash
    last_error: str | None = None
    restart_handle: asyncio.TimerHandle | None = None
    generation: int = 0  # which start of this model the process is: stale callbacks are ignored
    load_failed: bool = False

    @property
    def busy(self) -> bool:
        return bool(self.flights) or self.state == "starting"

    @property
    def holds_memory(self) -> bool:
        return self.state in ("starting", "ready", "backoff")


class ModelPool:
    """Routes requests to one worker per model; `sources` says how to start each known model."""

    def __init__(self, sources: Callable[[str], ModelSource | None], settings: PoolSettings,
                 on_exit: Callable[[str, bool], None] | None = None) -> None:
        self._sources = sources
        self.settings = settings
        self._workers: dict[str, _Worker] = {}
        self._ids = itertools.count(1)
        self._admission = asyncio.Lock()
        self._watchdog: asyncio.Task[None] | None = None
        self._on_exit = on_exit or (lambda model, crashed: None)
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        self._watchdog = asyncio.create_task(self._watch())

    async def close(self) -> None:
        self._closed = True
        if self._watchdog is not None:
            self._watchdog.cancel()
        await asyncio.gather(*(self._stop(worker) for worker in list(self._workers.values())))

    # --- requests ----------------------------------------------------------------------

    async def generate(self, model: str, request: Generate) -> tuple[Served, AsyncIterator[list[Token | Finish]]]:
        """Route `request` (its id is replaced) to `model`'s worker; raise `ModelRefused` before any token.

        The iterator yields the events that have come since the last step (at least one):
        Tokens, then one Finish whose `rule` says why it failed, if it did. Taking what is
        there, not one at a time, lets a stream write one chunk of several tokens.
        """
        worker = await self._acquire(model)
        flight = _Flight(next(self._ids), asyncio.Queue(), asyncio.get_running_loop().time() + request.timeout
                         + self.settings.stuck_grace_s)
        worker.flights[flight.id] = flight
        worker.last_used = time.monotonic()
        worker.outbox.put(encode(msgspec.structs.replace(request, id=flight.id)))
        first = await flight.events.get()
        if isinstance(first, Refused):
            worker.flights.pop(flight.id, None)
            raise ModelRefused(first.status, first.rule, first.detail)
        return Served(worker.pid or 0), self._events(worker, flight, first)

    async def _events(self, worker: _Worker, flight: _Flight, first: Token | Finish) -> AsyncIterator[list[Token | Finish]]:
        ready: list[Token | Finish | Refused] = [first]
        try:
            while True:
                while not flight.events.empty():
                    ready.append(flight.events.get_nowait())
                if any(isinstance(event, Refused) for event in ready):  # only ever first, handled in `generate`
                    raise AssertionError("a refusal after the first event")
                yield ready  # type: ignore[misc]
                if isinstance(ready[-1], Finish):
                    return
                ready = [await flight.events.get()]
        finally:
            if worker.flights.pop(flight.id, None) is not None and worker.state == "ready":
                worker.outbox.put(encode(Cancel(flight.id)))  # the caller went away mid-answer

    async def figures(self, model: str) -> FiguresReply | None:
        """The engine figures of `model`'s worker, or None when it is not running or does not answer."""
        worker = self._workers.get(model)
        if worker is None or worker.state != "ready":
            return None
        asking = next(self._ids)
        reply: asyncio.Future[FiguresReply] = asyncio.get_running_loop().create_future()
        worker.figures[asking] = reply
        worker.outbox.put(encode(Figures(asking)))
        try:
            async with asyncio.timeout(FIGURES_TIMEOUT_S):  # not wait_for: on 3.11 it can lose a cancel
                return await reply
        except TimeoutError:
            return None
        finally:
            worker.figures.pop(asking, None)

    def status(self) -> list[ModelStatus]:
        return [
            ModelStatus(model=w.model, state=w.state, pid=w.pid if w.state == "ready" else None,
                        declared_bytes=w.source.declared_bytes, in_flight=len(w.flights), restarts=w.restarts,
                        crashes_in_a_row=w.crashes, last_error=w.last_error)
            for w in sorted(self._workers.values(), key=lambda w: w.model)
        ]  # fmt: skip

    @property
    def used_bytes(self) -> int:
        return sum(w.source.declared_bytes for w in self._workers.values() if w.holds_memory)

    # --- admission -----------------------------------------------------------------------

    async def _acquire(self, model: str) -> _Worker:
        if self._closed:
            raise ModelRefused(503, "inference_unavailable", "the inference daemon is shutting down")
        async with self._admission:
            worker = self._workers.get(model)
            if worker is None:
                source = await asyncio.to_thread(self._sources, model)
                if source is None:
                    raise ModelRefused(404, "model_not_found", f"model {model!r} is not registered with this daemon")
                worker = self._workers[model] = _Worker(model, source)
            if worker.state == "unhealthy":
                if time.monotonic() - worker.unhealthy_since < self.settings.unhealthy_retry_s:
                    raise ModelRefused(503, "model_unhealthy",
                                       f"model {model!r} crashed {worker.crashes} times in a row ({worker.last_error}); "
                                       f"it is tried again {self.settings.unhealthy_retry_s:g} s after the last crash")
                worker.state = "stopped"
            if worker.state == "stopped":
                await self._make_room(worker)
                self._spawn(worker)
            ready = worker.ready
        assert ready is not None
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                await asyncio.shield(ready)
        except TimeoutError:
            raise ModelRefused(503, "model_unavailable", f"model {model!r} did not start within "
                                                         f"{self.settings.start_timeout_s:g} s") from None
        except ModelRefused:
            raise
        if worker.state != "ready":
            rule = "model_unavailable" if worker.load_failed else "model_crashed"
            raise ModelRefused(503, rule, f"model {model!r} stopped while starting: {worker.last_error}")
        return worker

    async def _make_room(self, worker: _Worker) -> None:
        budget, need = self.settings.memory_bytes, worker.source.declared_bytes
        if need > budget:
            raise ModelRefused(503, "model_capacity", f"model {worker.model!r} needs {need} bytes of weights; the "
                                                      f"daemon's memory budget (GENOME_INFERENCE_MEMORY_BYTES) is {budget}")
        while self.used_bytes + need > budget:
            idle = [w for w in self._workers.values() if w.holds_memory and not w.busy and w is not worker]
            if not idle:
                busy = ", ".join(sorted(w.model for w in self._workers.values() if w.holds_memory))
                raise ModelRefused(503, "model_capacity", f"model {worker.model!r} needs {need} bytes and the memory budget "
                                                          f"of {budget} is held by busy models ({busy}): retry later")
            await self._stop(min(idle, key=lambda w: w.last_used))

    # --- processes -------------------------------------------------------------------------

    def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        context = _start_method(worker.source.config.backend)
        ours, theirs = context.Pipe()
        process = context.Process(target=worker_module.main, args=(theirs, worker.source.config),
                                  name=f"genome-model-{worker.model}", daemon=True)
        process.start()
        theirs.close()
        worker.process, worker.pid = process, process.pid
        worker.state, worker.stopping, worker.load_failed = "starting", False, False
        worker.generation += 1
        worker.ready = loop.create_future()
        worker.outbox = queue.SimpleQueue()
        worker.last_used = time.monotonic()
        threading.Thread(target=_read, args=(ours, loop, worker, worker.generation, self._message, self._exited), daemon=True,
                         name=f"model-{worker.model}-reader").start()
        threading.Thread(target=_write, args=(ours, worker.outbox), daemon=True,
                         name=f"model-{worker.model}-writer").start()

    async def _stop(self, worker: _Worker) -> None:
        """Stop a worker on purpose (eviction, shutdown): its pipe closes and it exits."""
        if worker.restart_handle is not None:
            worker.restart_handle.cancel()
            worker.restart_handle = None
        process = worker.process
        worker.stopping = True
        worker.outbox.put(None)
        if process is not None and process.is_alive():
            # Nothing in a worker needs saving: SIGTERM ends it, and its pipe's end tells our reader.
            process.terminate()
            await asyncio.to_thread(process.join, STOP_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                await asyncio.to_thread(process.join)
        worker.state = "stopped"

    def kill(self, model: str) -> int | None:
        """SIGKILL `model`'s worker (as the kernel's OOM killer would); its pid, or None."""
        worker = self._workers.get(model)
        if worker is None or worker.pid is None or worker.state not in ("starting", "ready"):
            return None
        os.kill(worker.pid, signal.SIGKILL)
        return worker.pid

    def _message(self, worker: _Worker, generation: int, message: msgspec.Struct) -> None:
        if generation != worker.generation:
            return
        if isinstance(message, TokenOut | Tokens):
            for token in message.items if isinstance(message, Tokens) else [message]:
                flight = worker.flights.get(token.id)
                if flight is not None:
                    flight.events.put_nowait(Token(token.text, token.token_id))
        elif isinstance(message, Ended):
            flight = worker.flights.get(message.id)
            if flight is not None:
                flight.events.put_nowait(Finish(message.reason, message.prompt_tokens, message.completion_tokens,  # type: ignore[arg-type]
                                                message.error, rule=message.rule))
                if message.reason != "error":
                    worker.crashes = 0
        elif isinstance(message, Refused):
            flight = worker.flights.get(message.id)
            if flight is not None:
                flight.events.put_nowait(message)
        elif isinstance(message, FiguresReply):
            reply = worker.figures.get(message.id)
            if reply is not None and not reply.done():
                reply.set_result(message)
        elif isinstance(message, Ready):
            worker.state, worker.pid, worker.last_error = "ready", message.pid, None
            if worker.ready is not None and not worker.ready.done():
                worker.ready.set_result(None)
        elif isinstance(message, Failed):
            worker.last_error, worker.load_failed = message.detail, True

    def _exited(self, worker: _Worker, generation: int) -> None:
        """The worker's pipe closed: fail what it had in flight, then restart it unless stopped on purpose."""
        if generation != worker.generation:
            return
        crashed = not worker.stopping
        if worker.process is not None:
            worker.process.join(0.5)  # its pipe closed as it exited: this reaps it, at once
            if crashed and worker.last_error is None:
                worker.last_error = f"worker {worker.pid} exited with {_exit_text(worker.process.exitcode)}"
        for flight in list(worker.flights.values()):
            if flight.timed_out:
                finish = Finish("error", 0, 0, f"the request was still running {self.settings.stuck_grace_s:g} s past "
                                f"its timeout: its model worker was killed and restarts", rule="generation_timed_out")
            else:
                finish = Finish("error", 0, 0, f"the model worker for {worker.model!r} stopped mid-answer "
                                f"({worker.last_error or 'stopped'})", rule="model_crashed")
            flight.events.put_nowait(finish)
        worker.flights.clear()
        for reply in worker.figures.values():
            reply.cancel()
        starting = worker.ready
        worker.state = "stopped"
        if starting is not None and not starting.done():
            starting.set_result(None)  # `_acquire` sees the state and refuses
        self._on_exit(worker.model, crashed)
        if not crashed or self._closed:
            return
        worker.crashes += 1
        if worker.crashes >= self.settings.max_crashes:
            worker.state, worker.unhealthy_since = "unhealthy", time.monotonic()
            return
        worker.restarts += 1
        worker.state = "backoff"
        delay = min(self.settings.restart_backoff_s * 2 ** (worker.crashes - 1), self.settings.max_restart_backoff_s)
        loop = asyncio.get_running_loop()
        worker.ready = loop.create_future()  # requests arriving meanwhile wait for the restart
        worker.restart_handle = loop.call_later(delay, self._restart, worker)

    def _restart(self, worker: _Worker) -> None:
        worker.restart_handle = None
        if worker.state != "backoff" or self._closed:
            return
        waiting = worker.ready
        self._spawn(worker)
        if waiting is not None and worker.ready is not None:
            worker.ready.add_done_callback(lambda _: waiting.done() or waiting.set_result(None))

    async def _watch(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(0.25)
            now = loop.time()
            for worker in list(self._workers.values()):
                late = [f for f in worker.flights.values() if f.deadline < now]
                if late and worker.state == "ready" and worker.pid is not None:
                    for flight in late:
                        flight.timed_out = True
                    worker.last_error = f"killed: a request ran {self.settings.stuck_grace_s:g} s past its timeout"
                    os.kill(worker.pid, signal.SIGKILL)


def _exit_text(code: int | None) -> str:
    if code is None:
        return "no exit code yet"
    if code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"exit code {code}"


def _read(connection: Connection, loop: asyncio.AbstractEventLoop, worker: _Worker, generation: int,
          on_message: Callable[[_Worker, int, msgspec.Struct], None], on_exit: Callable[[_Worker, int], None]) -> None:
    while True:
        try:
            message = decode_from_worker(connection.recv_bytes())
        except (EOFError, OSError):
            break
        except msgspec.DecodeError:
            continue
        loop.call_soon_threadsafe(on_message, worker, generation, message)
    connection.close()
    try:
        loop.call_soon_threadsafe(on_exit, worker, generation)
    except RuntimeError:  # the daemon's loop has closed
        pass


def _write(connection: Connection, outbox: queue.SimpleQueue[bytes | None]) -> None:
    # Only the reader closes the connection (at EOF): closing it under a blocked reader would not wake it.
    while (data := outbox.get()) is not None:
        try:
            connection.send_bytes(data)
        except (BrokenPipeError, OSError):
            return


def _start_method(backend: str) -> multiprocessing.context.BaseContext:
    """How a worker process starts: forked from a torch-preloaded forkserver, or spawned afresh.

    Forking after these imports is safe: their only threads are OpenBLAS's idle pools, which
    it re-creates in a child (pthread_atfork), and torch starts its own pool and touches a
    device only when first used, as DataLoader workers rely on. The forkserver runs no model.
    """
    if backend != "torch" or "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(TORCH_PRELOAD)  # read when the forkserver starts: the first torch worker
    return context
