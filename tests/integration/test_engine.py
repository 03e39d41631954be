"""The engine over the real torch backend on a tiny random Llama: queue, priorities, timeouts, cancellation, metrics."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path

import numpy as np
import pytest

from inference.backends.base import ChatMessage, Finish, Sampling, Token, never_cancelled
from inference.backends.torch import TorchBackend
from inference.engine import Engine, EngineClosed, QueueFull
from inference.lora.cache import AdapterCache, LoadedAdapter, StackCache
from inference.lora.stack import LoraStack

QUESTION = [ChatMessage("user", "What is the capital of France?")]
SHORT = Sampling(max_tokens=8)


class Gated:
    """The real backend behind a gate: a request that reaches the model waits until the test opens it.

    This makes "one request is running, others wait" a fact instead of a race.
    """

    name = "gated"

    def __init__(self, backend: TorchBackend) -> None:
        self.backend = backend
        self.entered = threading.Event()
        self.gate = threading.Event()
        self.calls = 0

    @property
    def loads(self) -> int:
        return self.backend.loads

    def generate(
        self,
        messages: Sequence[ChatMessage],
        stack: LoraStack | None,
        sampling: Sampling,
        cancelled: Callable[[], bool] = never_cancelled,
    ) -> Iterator[Token | Finish]:
        self.calls += 1
        self.entered.set()
        self.gate.wait()
        return self.backend.generate(messages, stack, sampling, cancelled)


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TorchBackend:
    return TorchBackend(tiny_model, device="cpu")


def sample(engine: Engine, name: str, labels: dict[str, str] | None = None) -> float:
    value = engine.metrics.registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else value


async def drain(events) -> tuple[str, Finish]:  # type: ignore[no-untyped-def]
    text = ""
    async for event in events:
        if isinstance(event, Finish):
            return text, event
        text += event.text
    raise AssertionError("no Finish")


def test_the_stream_is_what_the_backend_yields(backend: TorchBackend) -> None:
    async def run() -> list[Token | Finish]:
        async with Engine(backend) as engine:
            return [event async for event in engine.stream(QUESTION, None, SHORT)]

    events = asyncio.run(run())
    assert events == list(backend.generate(QUESTION, None, SHORT))
    assert isinstance(events[-1], Finish) and sum(isinstance(e, Finish) for e in events) == 1


def test_higher_priority_runs_first_then_first_come(backend: TorchBackend) -> None:
    gated = Gated(backend)

    async def run() -> list[str]:
        async with Engine(gated) as engine:
            done: list[str] = []

            async def finish(name: str, events) -> None:  # type: ignore[no-untyped-def]
                await drain(events)
                done.append(name)

            first = engine.stream(QUESTION, None, SHORT)
            await asyncio.to_thread(gated.entered.wait)  # "first" holds the model
            # stream() queues at once, so these wait in exactly this arrival order.
            waiting = [(n, engine.stream(QUESTION, None, SHORT, priority=p)) for n, p in (("low", 0), ("high", 5), ("low2", 0))]
            gated.gate.set()
            await asyncio.gather(finish("first", first), *(finish(n, e) for n, e in waiting))
            return done

    assert asyncio.run(run()) == ["first", "high", "low", "low2"]


def test_a_full_queue_refuses_at_once_with_a_clear_error(backend: TorchBackend) -> None:
    gated = Gated(backend)

    async def run() -> tuple[str, float]:
        async with Engine(gated, max_queue=1) as engine:
            running = engine.stream(QUESTION, None, SHORT)
            await asyncio.to_thread(gated.entered.wait)
            waiting = engine.stream(QUESTION, None, SHORT)
            with pytest.raises(QueueFull, match=r"the inference queue is full \(1 requests waiting\): retry later"):
                engine.stream(QUESTION, None, SHORT)
            depth = sample(engine, "genome_inference_queue_depth")
            gated.gate.set()
            await drain(running)
            await drain(waiting)
            return str(sample(engine, "genome_inference_rejected_requests_total")), depth

    assert asyncio.run(run()) == ("1.0", 1.0)


def test_a_request_past_its_timeout_ends_with_an_error_and_never_runs(backend: TorchBackend) -> None:
    gated = Gated(backend)

    async def run() -> Finish:
        async with Engine(gated) as engine:
            running = engine.stream(QUESTION, None, SHORT)
            await asyncio.to_thread(gated.entered.wait)
            _, finish = await drain(engine.stream(QUESTION, None, SHORT, timeout=0.01))
            gated.gate.set()
            await drain(running)
            await drain(engine.stream(QUESTION, None, SHORT))  # the worker is past the timed-out one
            return finish

    finish = asyncio.run(run())
    assert finish.reason == "error" and finish.error == "request timed out after 0.01 s"
    assert gated.calls == 2


def test_a_running_request_past_its_timeout_ends_with_one_timeout_error(backend: TorchBackend) -> None:
    gated = Gated(backend)

    async def run() -> tuple[Finish, float, float]:
        async with Engine(gated) as engine:
            events = engine.stream(QUESTION, None, Sampling(max_tokens=500), timeout=0.01)
            await asyncio.to_thread(gated.entered.wait)  # running, held at the gate past its timeout
            _, finish = await drain(events)
            gated.gate.set()
            await drain(engine.stream(QUESTION, None, SHORT))  # one worker: the first has ended
            errors = sample(engine, "genome_inference_requests_total", {"reason": "error"})
            return finish, errors, sample(engine, "genome_inference_requests_total", {"reason": "cancelled"})

    finish, errors, cancelled = asyncio.run(run())
    assert finish.error == "request timed out after 0.01 s" and (errors, cancelled) == (1.0, 0.0)


def test_a_dropped_client_cancels_its_generation(backend: TorchBackend) -> None:
    async def run() -> tuple[float, int]:
        async with Engine(backend) as engine:
            events = engine.stream(QUESTION, None, Sampling(max_tokens=500))
            tokens = 0
            async for event in events:
                tokens += isinstance(event, Token)
                if tokens == 2:
                    break
            await events.aclose()  # what an HTTP server does when the client goes away
            await drain(engine.stream(QUESTION, None, SHORT))  # one worker: the first has ended
            return sample(engine, "genome_inference_requests_total", {"reason": "cancelled"}), tokens

    # Left alone, this answer would end by stop, length or repetition, never "cancelled".
    assert asyncio.run(run()) == (1.0, 2)


def test_a_cancel_that_lands_as_a_token_arrives_still_cancels_the_generation(backend: TorchBackend) -> None:
    """asyncio's one-shot `task.cancel()`, as the inference daemon's worker cancels a request whose
    caller went away, reaches the generation whichever step of taking the next token it lands in.
    Python 3.11's `asyncio.wait_for` returned a token already taken from the queue instead: the
    cancel was lost and the answer ran to its end (a stopped chat went on generating in the daemon)."""

    def after(loop: asyncio.AbstractEventLoop, turns: int, callback: Callable[[], object]) -> None:
        if turns == 0:
            callback()
        else:
            loop.call_soon(after, loop, turns - 1, callback)

    async def consume(engine: Engine, turns: int) -> None:
        task, loop = asyncio.current_task(), asyncio.get_running_loop()
        assert task is not None
        async with aclosing(engine.stream(QUESTION, None, Sampling(max_tokens=500, ignore_eos=True))) as events:
            first = True
            async for _ in events:
                if first:
                    await asyncio.sleep(0.05)  # tokens queue up meanwhile: the next one is there at once
                    after(loop, turns, task.cancel)  # lands 1..6 turns of the loop into taking it
                    first = False

    async def run() -> tuple[list[str], float]:
        async with Engine(backend) as engine:
            ends = []
            for turns in range(1, 7):
                try:
                    await asyncio.create_task(consume(engine, turns))
                    ends.append("answered")
                except asyncio.CancelledError:
                    ends.append("cancelled")
            await drain(engine.stream(QUESTION, None, SHORT))  # after the cancelled ones have left the batch
            return ends, sample(engine, "genome_inference_requests_total", {"reason": "cancelled"})

    assert asyncio.run(run()) == (["cancelled"] * 6, 6.0)


def test_metrics_count_tokens_ttft_and_stack_cache_hits(backend: TorchBackend) -> None:
    rng = np.random.default_rng(0)
    adapter = LoadedAdapter(
        {"layers.0.q_proj": (rng.standard_normal((2, 64)).astype(np.float32), rng.standard_normal((64, 2)).astype(np.float32))},
        1.0,
    )
    stacks = StackCache(4, AdapterCache(1 << 20))

    async def run() -> Engine:
        async with Engine(backend, stack_hit_rate=lambda: stacks.hit_rate) as engine:
            for _ in range(3):
                await engine.complete(QUESTION, stacks.get([("a", 1.0)], lambda _: adapter), SHORT)
            return engine

    engine = asyncio.run(run())
    assert sample(engine, "genome_inference_stack_cache_hit_ratio") == pytest.approx(2 / 3)
    assert sample(engine, "genome_inference_time_to_first_token_seconds_count") == 3.0
    assert sample(engine, "genome_inference_tokens_per_second_count") == 3.0
    assert sample(engine, "genome_inference_completion_tokens_total") == 3 * SHORT.max_tokens
    assert sample(engine, "genome_inference_active_requests") == 0.0


def test_a_backend_error_ends_that_request_only(backend: TorchBackend) -> None:
    misfit = LoraStack(
        key="misfit", layers=(("x", 1.0),),
        modules={"layers.9.q_proj": (np.zeros((1, 64), np.float32), np.zeros((64, 1), np.float32))}, parts=(),
    )  # fmt: skip

    async def run() -> tuple[Finish, Finish]:
        async with Engine(backend) as engine:
            _, failed = await engine.complete(QUESTION, misfit, SHORT)
            _, fine = await engine.complete(QUESTION, None, SHORT)
            return failed, fine

    failed, fine = asyncio.run(run())
    assert failed.reason == "error" and failed.error is not None
    assert failed.error.startswith("StackMismatch: stack module 'layers.9.q_proj' is not in")
    assert fine.reason == "length"


def test_a_closed_engine_refuses_requests(backend: TorchBackend) -> None:
    async def run() -> None:
        engine = Engine(backend)
        with pytest.raises(EngineClosed, match="not running"):
            engine.stream(QUESTION, None, SHORT)
        async with engine:
            pass
        with pytest.raises(EngineClosed):
            engine.stream(QUESTION, None, SHORT)

    asyncio.run(run())


def test_bad_limits_are_refused(backend: TorchBackend) -> None:
    with pytest.raises(ValueError, match="expected max_queue >= 1 and timeout > 0, got 0 and 1"):
        Engine(backend, max_queue=0, timeout=1)


def test_a_backend_that_does_not_batch_runs_up_to_concurrency_requests_at_once(backend: TorchBackend) -> None:
    """What the openai backend gets: requests go to the server together (it batches them there)."""

    class Together(Gated):
        # Every request waits here until all three are inside generate: run one after another, they would fail.
        def __init__(self, backend: TorchBackend) -> None:
            super().__init__(backend)
            self.barrier = threading.Barrier(3, timeout=30)

        def generate(self, messages, stack, sampling, cancelled=never_cancelled):  # type: ignore[no-untyped-def]
            self.barrier.wait()
            return self.backend.generate(messages, stack, sampling, cancelled)

    async def run() -> tuple[list[Finish], int, str]:
        async with Engine(Together(backend), concurrency=3) as engine:
            outcomes = await asyncio.gather(*(drain(engine.stream(QUESTION, None, SHORT)) for _ in range(3)))
            stats = engine.stats()
            return [finish for _, finish in outcomes], stats.max_batch, stats.mode

    finishes, width, mode = asyncio.run(run())
    assert [f.reason for f in finishes] == ["length"] * 3 and (width, mode) == (3, "concurrent")
