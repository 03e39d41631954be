"""The academy on the process's one inference engine: no second copy of the base model.

The server's chat engine (`genome_service/chat/runtime.py`) owns the model. Academy code is
synchronous and runs on threads of its own (request threads, the embedded worker), so it
reaches the engine through `EngineBackend`: a `Backend` whose every generation is one
engine request, queued with the chats and run by the engine's one thread, which is the
only place the model is ever called.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator, Sequence

from genome_service.academy.judge import Judgement
from genome_service.academy.runner import Runner, RunnerSettings
from genome_service.chat.runtime import ChatRuntime
from genome_service.domain.academy import Challenge, Difficulty
from genome_service.domain.layer import TraitType
from genome_service.eventstore.records import EventMetadata
from genome_service.services.academy_sessions import AcademySessions
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller
from inference.backends.base import ChatMessage, Finish, Sampling, Token, never_cancelled
from inference.daemon.client import DaemonEngine
from inference.daemon.protocol import StackEntry
from inference.engine import Engine
from inference.lora.stack import LoraStack

# Chats are people waiting on an answer; academy generations are background work.
ACADEMY_PRIORITY = -1
# How often a generation waiting for the engine asks whether it was cancelled.
POLL_SECONDS = 0.1


class EngineBackend:
    """`engine`, whose loop is `loop`, as a synchronous Backend for code on other threads."""

    def __init__(self, engine: Engine | DaemonEngine, loop: asyncio.AbstractEventLoop, *, priority: int = ACADEMY_PRIORITY,
                 timeout: float | None = None) -> None:
        self.name = engine.backend.name
        self._engine = engine
        self._loop = loop
        self._priority = priority
        self._timeout = timeout

    @property
    def loads(self) -> int:
        return self._engine.backend.loads

    def generate(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | list[StackEntry] | None,
        sampling: Sampling,
        cancelled: Callable[[], bool] = never_cancelled,
    ) -> Iterator[Token | Finish]:
        events: queue.SimpleQueue[Token | Finish] = queue.SimpleQueue()

        async def pump() -> None:
            try:
                stream = self._engine.stream(messages, stack, sampling, priority=self._priority, timeout=self._timeout)  # type: ignore[arg-type]
                async for event in stream:
                    events.put(event)
            except Exception as exc:  # noqa: BLE001 - a full queue or a closed engine ends this generation
                events.put(Finish("error", 0, 0, f"{type(exc).__name__}: {exc}"))

        future = asyncio.run_coroutine_threadsafe(pump(), self._loop)
        try:
            while not cancelled():
                try:
                    event = events.get(timeout=POLL_SECONDS)
                except queue.Empty:
                    continue
                yield event
                if isinstance(event, Finish):
                    return
            yield Finish("cancelled", 0, 0)
        finally:
            # Cancelling the request's task closes its stream, which stops the generation.
            future.cancel()


class SharedEngine:
    """Runners on the chat runtime's engine (loaded on first use, then shared with the chats)."""

    def __init__(self, services: Services, runtime: ChatRuntime) -> None:
        self.services = services
        self.runtime = runtime

    async def runner(self, stopping: threading.Event | None = None) -> Runner:
        loaded = await self.runtime.ready()
        # Not the chat timeout: queued behind chats, a generation may wait a while to start.
        backend = EngineBackend(loaded.engine, asyncio.get_running_loop(),
                                timeout=self.services.settings.inference_timeout)
        settings = RunnerSettings.from_settings(self.services.settings)
        return Runner(self.services, backend, loaded.model, settings, stopping=stopping, stacks=loaded.resolver)

    def runner_from_thread(self, loop: asyncio.AbstractEventLoop, stopping: threading.Event | None = None) -> Runner:
        """`runner` for a thread other than the loop's: blocks until the model is loaded."""
        return asyncio.run_coroutine_threadsafe(self.runner(stopping), loop).result()

    async def challenge(
        self, caller: Caller, session_id: str, trait_type: TraitType, difficulty: Difficulty, metadata: EventMetadata,
    ) -> Challenge:
        """A challenge the model writes for one of the caller's sessions, recorded in it."""
        await asyncio.to_thread(AcademySessions(self.services).visible, caller, session_id)
        runner = await self.runner()
        return await asyncio.to_thread(runner.add_challenge, session_id, trait_type, difficulty, metadata)

    async def score(self, caller: Caller, session_id: str, challenge_id: str, response: str, metadata: EventMetadata) -> Judgement:
        """The judge's verdict on an answer to one of the session's challenges, recorded in it."""
        await asyncio.to_thread(AcademySessions(self.services).visible, caller, session_id)
        runner = await self.runner()
        return await asyncio.to_thread(runner.score_response, session_id, challenge_id, response, metadata)
