"""Chat turns for recipe steps, which run on worker threads while chat is asynchronous.

In the server the turn goes to the server's own engine on its event loop (``LoopChat``);
a worker process has no loop, so ``OwnLoopChat`` starts one on a thread of its own, with a
chat runtime that loads the model on the first chat step only.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
from collections.abc import Callable

from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.service import Chat, ChatAnswer, ChatAsk
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, EventMetadata

# How often a thread waiting on a turn asks whether its run was cancelled.
POLL_SECONDS = 0.1


class LoopChat:
    """Turns of `chat` on `loop`, which another thread runs."""

    def __init__(self, chat: Chat, loop: asyncio.AbstractEventLoop) -> None:
        self.chat = chat
        self.loop = loop

    def __call__(self, caller: Caller, persona_id: str, ask: ChatAsk, metadata: EventMetadata,
                 cancelled: Callable[[], bool]) -> ChatAnswer:
        async def turn() -> ChatAnswer:
            return await self.chat.answer(await self.chat.start(caller, persona_id, ask, metadata))

        future = asyncio.run_coroutine_threadsafe(turn(), self.loop)
        try:
            while True:
                try:
                    return future.result(timeout=POLL_SECONDS)
                except concurrent.futures.TimeoutError:
                    cancelled()  # raises to give the turn up
        finally:
            # Cancelling the turn's task closes its stream, which stops the generation.
            future.cancel()


class OwnLoopChat:
    """Turns on an event loop and chat runtime of this object's own, started on the first turn."""

    def __init__(self, services: Services) -> None:
        self.services = services
        self._started: tuple[LoopChat, threading.Thread, ChatRuntime] | None = None
        self._lock = threading.Lock()

    def __call__(self, caller: Caller, persona_id: str, ask: ChatAsk, metadata: EventMetadata,
                 cancelled: Callable[[], bool]) -> ChatAnswer:
        return self._chat()(caller, persona_id, ask, metadata, cancelled)

    def close(self) -> None:
        started, self._started = self._started, None
        if started is None:
            return
        chat, thread, runtime = started
        asyncio.run_coroutine_threadsafe(runtime.close(), chat.loop).result()
        chat.loop.call_soon_threadsafe(chat.loop.stop)
        thread.join()
        chat.loop.close()

    def _chat(self) -> LoopChat:
        with self._lock:
            if self._started is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="recipe-chat", daemon=True)
                thread.start()
                runtime = ChatRuntime(self.services)
                self._started = (LoopChat(Chat(self.services, runtime), loop), thread, runtime)
            return self._started[0]
