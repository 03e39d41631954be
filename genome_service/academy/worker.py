"""The academy worker: claims academy sessions and recipe runs that need running and runs
them, one at a time.

A claim is a lock that dies with its holder, so a worker killed mid-session frees the
session at once and the next worker to look resumes it from its events (a recipe run too):

- PostgreSQL: a session-level advisory lock (`pg_try_advisory_lock`) on a connection kept
  open for the run; several workers on several machines never run one session together.
- SQLite (one machine by nature): an exclusive `flock` on a file per session.

Claimable sessions are those the read model shows pending or running (running with no
lock held means its worker died); claimable runs are the same, less those whose
asynchronous step waits on a session that has not ended: no thread waits on them.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from genome_service.academy.runner import Runner, RunnerSettings
from genome_service.academy.shared_engine import SharedEngine
from genome_service.chat.service import Chat
from genome_service.domain.academy import TERMINAL, AcademySession
from genome_service.domain.recipe_run import TERMINAL as RUN_ENDED
from genome_service.domain.recipe_run import RECIPE_RUN, RecipeRun
from genome_service.recipes.chat_turns import LoopChat
from genome_service.recipes.executor import Executor
from genome_service.recipes.service import RecipeRuns
from genome_service.services.academy_sessions import AcademySessions
from genome_service.services.bootstrap import Services

log = logging.getLogger("genome_service.academy")
# A run checks for a stop between tokens and steps; this bounds a slow one at shutdown.
STOP_SECONDS = 30.0


def open_runner(services: Services, stopping: threading.Event | None = None) -> Runner:
    """A runner on the model the settings name, loaded by the backend they choose; `stopping`
    set stops its session at the next step or token, still running, for a worker to resume."""
    from genome_service.services.backend import open_configured_backend

    settings = services.settings
    if settings.inference_url:
        # Generation through the inference daemon, on an event loop of the runner's own; training
        # still loads its own copy of the model, when a session gets to it.
        from genome_service.chat.runtime import ChatRuntime

        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, name="academy-inference", daemon=True).start()
        return SharedEngine(services, ChatRuntime(services)).runner_from_thread(loop, stopping)
    backend, _ = open_configured_backend(settings, services.models)
    return Runner(services, backend, settings.inference_model, RunnerSettings.from_settings(settings),
                  stopping=stopping)


def finished(state: AcademySession | RecipeRun) -> bool:
    return state.status in (TERMINAL if isinstance(state, AcademySession) else RUN_ENDED)


class Worker:
    """Runs sessions with the runner `make_runner` gives, made on the first session (the model loads
    then), and recipe runs with the executor `make_executor` gives (none: this worker runs no recipes)."""

    def __init__(self, services: Services, make_runner: Callable[[], Runner], *, poll_seconds: float = 1.0,
                 make_executor: Callable[[], Executor] | None = None) -> None:
        self.services = services
        self._make_runner = make_runner
        self._runner: Runner | None = None
        self._make_executor = make_executor
        self._executor: Executor | None = None
        self.poll_seconds = poll_seconds

    @property
    def runner(self) -> Runner:
        if self._runner is None:
            self._runner = self._make_runner()
        return self._runner

    def candidates(self) -> list[str]:
        """Sessions that need a worker, oldest first."""
        return AcademySessions(self.services).waiting()

    def run_next(self) -> AcademySession | RecipeRun | None:
        """Claim and run one session, else one recipe run (until it ends or waits on a session);
        None when every one is taken or there is none."""
        for session_id in self.candidates():
            with self.claim(session_id) as claimed:
                if claimed:
                    return self.runner.run(session_id)
        if self._make_executor is None:
            return None
        for run_id in RecipeRuns(self.services).waiting():
            with self.claim(f"recipe-run-{run_id}") as claimed:
                if claimed:
                    return self.executor.run(run_id)
        return None

    def run(self, stop: threading.Event, *, until_idle: bool = False,
            on_finished: Callable[[AcademySession | RecipeRun], None] | None = None) -> None:
        """Run sessions and recipe runs until `stop` is set (or, with `until_idle`, until none is left
        to claim); `on_finished` gets each that ended, not one a stop left running nor a waiting run."""
        while not stop.is_set():
            done = self.run_next()
            if done is None:
                if until_idle:
                    return
                stop.wait(self.poll_seconds)
            elif on_finished is not None and finished(done):
                on_finished(done)

    @property
    def executor(self) -> Executor:
        if self._executor is None:
            assert self._make_executor is not None, "this worker runs no recipes"
            self._executor = self._make_executor()
        return self._executor

    def see_through(self, run_id: str, stop: threading.Event) -> RecipeRun | None:
        """Run one recipe run to its end here, and the academy session it waits on; while another
        worker holds either, wait for it. None when `stop` is set first (the run goes on elsewhere)."""
        while not stop.is_set():
            with self.claim(f"recipe-run-{run_id}") as claimed:
                state = self.executor.run(run_id) if claimed else self.services.repository.load(RECIPE_RUN, run_id).state
            assert state is not None
            if finished(state):
                return state
            ran = False
            if state.awaited is not None:
                with self.claim(state.awaited.stream_id) as held:
                    if held:
                        self.runner.run(state.awaited.stream_id)
                        ran = True
            if not (claimed and ran):
                stop.wait(self.poll_seconds)
        return None

    @contextmanager
    def claim(self, key: str) -> Iterator[bool]:
        """Hold `key` (a session's id, or ``recipe-run-`` and a run's) while the block runs, if no one else does."""
        if self.services.database.dialect == "postgresql":
            with _advisory_lock(self.services, key) as held:
                yield held
        else:
            with _file_lock(self.services.settings.data_dir / "academy" / "locks" / f"{key}.lock") as held:
                yield held


def embedded_worker(services: Services, engine: SharedEngine) -> EmbeddedWorker | None:
    """The server's own worker, when GENOME_ACADEMY_WORKER asks for one (auto: on SQLite only).

    On PostgreSQL the service scales out, and training is long CPU or GPU work that belongs
    in `genome-service academy worker` processes rather than in the API's.
    """
    mode = services.settings.academy_worker
    if mode == "auto":
        mode = "embedded" if services.database.dialect == "sqlite" else "off"
    return EmbeddedWorker(services, engine) if mode == "embedded" else None


class EmbeddedWorker:
    """The server's own worker thread, on the server's one inference engine: started and stopped with the app."""

    def __init__(self, services: Services, engine: SharedEngine) -> None:
        self._services = services
        self._engine = engine
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        # Called on the app's event loop, the one the engine runs on.
        loop = asyncio.get_running_loop()
        chat = LoopChat(Chat(self._services, self._engine.runtime), loop)
        worker = Worker(self._services, lambda: self._engine.runner_from_thread(loop, self._stop),
                        make_executor=lambda: Executor(self._services, chat, stopping=self._stop))
        self._thread = threading.Thread(target=self._run, args=(worker,), name="academy-worker", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        """Stop the session in progress at its next token or step (it stays running, for the
        next start to resume) before the engine it generates with closes."""
        self._stop.set()
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join, STOP_SECONDS)

    def _run(self, worker: Worker) -> None:
        try:
            worker.run(self._stop)
        except Exception:  # noqa: BLE001 - a thread's error would vanish; log it where operators look
            log.exception("academy worker stopped")


@contextmanager
def _advisory_lock(services: Services, name: str) -> Iterator[bool]:
    # Advisory locks take a 64-bit key: the first 8 bytes of the name's digest.
    key = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)
    with services.database.write_engine.connect() as connection:
        held = bool(connection.exec_driver_sql("SELECT pg_try_advisory_lock(%s)", (key,)).scalar())
        connection.commit()
        try:
            yield held
        finally:
            if held:
                connection.exec_driver_sql("SELECT pg_advisory_unlock(%s)", (key,))
                connection.commit()


@contextmanager
def _file_lock(path: Path) -> Iterator[bool]:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
