"""Continuous batching on the real torch and mlx backends (tiny random Llama, fp32): exact
per-row stacks, rows joining and leaving, per-row generators, cancellation, the KV budget and
the metrics.

The reference is the backend's one-request forward pass (`logits`, which runs a stack's
rank-concatenated factors and never touches the batch code).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fixtures.make_adapter import random_canonical
from fixtures.make_model import tiny_spec
from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.backends.torch import TorchBackend
from inference.engine import Engine
from inference.lora.stack import LoraStack, StackLayer, assemble

TOLERANCE = 1e-4
STEPS = 32


@pytest.fixture(scope="module")
def backend(tiny_model: Path) -> TorchBackend:
    return TorchBackend(tiny_model, device="cpu")


@pytest.fixture(scope="module", params=["torch", "mlx"])
def any_backend(request: pytest.FixtureRequest, tiny_model: Path, backend: TorchBackend) -> Any:
    """Each backend that batches: the same behaviour is asked of both."""
    if request.param == "torch":
        return backend
    mlx = pytest.importorskip("inference.backends.mlx", reason="mlx-lm is not installed")
    return mlx.MlxBackend(tiny_model)


@pytest.fixture(scope="module")
def stacks(tiny_model: Path) -> list[LoraStack | None]:
    """Eight personas: no stack, and 1-3 layer stacks of mixed ranks and modules sharing layers."""
    spec = tiny_spec(tiny_model)

    def layer(name: str, rank: int, modules: tuple[str, ...], seed: int, scale: float) -> StackLayer:
        # Scaled up so that each stack moves the logits far more than the tolerance.
        canonical = {k: (a * 8, b * 8) for k, (a, b) in random_canonical(spec, rank, modules, (0, 1), seed).items()}
        return (name, 1.0, canonical, scale)

    pool = [
        layer("style", 2, ("q_proj", "v_proj"), 1, 2.0),
        layer("facts", 4, ("o_proj", "down_proj"), 2, 1.5),
        layer("tone", 8, ("gate_proj", "up_proj", "k_proj"), 3, 1.0),
        layer("humour", 3, ("q_proj", "up_proj"), 4, 2.0),
        layer("brevity", 6, ("v_proj", "o_proj", "down_proj"), 5, 1.0),
        layer("accent", 1, ("k_proj",), 6, 4.0),
    ]

    def weighted(index: int, weight: float) -> StackLayer:
        name, _, canonical, scale = pool[index]
        return (name, weight, canonical, scale)

    return [
        None,
        assemble([weighted(0, 1.0)]),
        assemble([weighted(0, 1.0), weighted(1, 1.0)]),
        assemble([weighted(1, 0.5), weighted(2, 1.0)]),
        assemble([weighted(3, 1.0)]),
        assemble([weighted(2, 1.0), weighted(3, 1.0), weighted(0, 0.3)]),
        assemble([weighted(4, 1.0), weighted(5, 1.0)]),
        assemble([weighted(5, 2.0), weighted(1, -0.7)]),
    ]


def prompts(backend: Any, count: int) -> list[list[int]]:
    # Different lengths, so rows are padded differently.
    return [backend.encode_chat([ChatMessage("user", "Tell me about the sea. " * (1 + i % 4))]) for i in range(count)]


def joined(batch: Any, ids: list[int], stack: LoraStack | None) -> tuple[Any, np.ndarray]:
    row = batch.open_ids(ids, stack, Sampling())
    assert not isinstance(row, Finish)
    while (logits := batch.prefill(row)) is None:
        pass
    return row, np.asarray(logits)


def test_each_row_decodes_exactly_with_its_own_stack_never_anothers_as_rows_join_and_leave(
    any_backend: Any, stacks: list[LoraStack | None]
) -> None:
    backend = any_backend
    ids = prompts(backend, len(stacks))
    forced = [[int(t) for t in np.random.default_rng(i).integers(3, 200, STEPS + 1)] for i in range(len(stacks))]

    # One forward pass over the whole forced sequence: being causal, its position
    # len(prompt) - 1 + t holds the logits after the prompt and t forced tokens.
    passes: dict[tuple[int, int], np.ndarray] = {}

    def reference(persona: int, steps: int, stack_of: int | None = None) -> np.ndarray:
        stack_index = persona if stack_of is None else stack_of
        if (persona, stack_index) not in passes:
            passes[persona, stack_index] = backend.logits(ids[persona] + forced[persona], stacks[stack_index])
        return passes[persona, stack_index][len(ids[persona]) - 1 + steps]

    # A prefill chunk shorter than the prompts: every prompt is run in several pieces.
    batch = backend.batch(prefill_chunk=7)
    rows: dict[Any, int] = {}
    steps: dict[Any, int] = {}
    worst = 0.0
    compared = agreed = 0

    def check(row: Any, logits: np.ndarray) -> None:
        nonlocal worst, compared, agreed
        expected = reference(rows[row], steps[row])
        worst = max(worst, float(np.abs(logits - expected).max()))
        top2 = np.sort(expected)[-2:]
        if top2[1] - top2[0] > 1e-3:
            compared += 1
            agreed += int(np.argmax(logits) == np.argmax(expected))
        row.next_token = forced[rows[row]][steps[row]]
        steps[row] += 1

    def join(persona: int) -> None:
        row, logits = joined(batch, ids[persona], stacks[persona])
        rows[row], steps[row] = persona, 0
        check(row, logits)

    for persona in range(6):
        join(persona)
    leaver = next(row for row, persona in rows.items() if persona == 2)
    for step in range(STEPS + 12):
        if step == 10:  # a row leaves mid-stream
            batch.remove(leaver)
            del rows[leaver]
        if step == 12:  # two rows join mid-stream, shorter than the rows already there
            join(6)
            join(7)
        for row, logits in batch.forward().items():
            check(row, np.asarray(logits))
        for row in [row for row, done in steps.items() if done > STEPS and row in rows]:
            batch.remove(row)
            del rows[row]
        if not rows:
            break
    assert not batch.rows and batch.union_rank == 0
    assert worst <= TOLERANCE, worst
    assert compared > 100 and agreed == compared
    # A swapped stack could not pass: every persona's stack moves its logits far past the tolerance.
    for persona in range(len(stacks)):
        for steps_in in (0, STEPS // 2):
            own = reference(persona, steps_in)
            for other in range(len(stacks)):
                if other != persona:
                    assert np.abs(reference(persona, steps_in, stack_of=other) - own).max() > 100 * TOLERANCE


def test_shared_layers_are_stored_once_in_the_union(backend: TorchBackend, stacks: list[LoraStack | None]) -> None:
    batch = backend.batch()
    ids = prompts(backend, 1)[0]
    for persona in (1, 2, 5):  # style; style + facts; tone + humour + style
        joined(batch, ids, stacks[persona])
    assert batch.union is not None
    assert batch.union.layers == ("style", "facts", "tone", "humour")
    # q_proj: style (rank 2) and humour (rank 3) once each, however many rows use them.
    a, b, gains = batch.union.modules["layers.0.q_proj"]
    assert a.shape[0] == b.shape[1] == gains.shape[2] == 5 and gains.shape[0] == 3
    expected = [[2.0, 2.0, 0, 0, 0], [2.0, 2.0, 0, 0, 0], [0.6, 0.6, 2.0, 2.0, 2.0]]  # w * s per row and column
    np.testing.assert_allclose(gains[:, 0, :].numpy(), expected, rtol=1e-6)


def drain_text(events: list[Token | Finish]) -> tuple[str, Finish]:
    finish = events[-1]
    assert isinstance(finish, Finish)
    return "".join(e.text for e in events if isinstance(e, Token)), finish


async def collect(engine: Engine, messages: list[ChatMessage], stack: LoraStack | None, sampling: Sampling,
                  **options: object) -> tuple[str, Finish]:
    return drain_text([event async for event in engine.stream(messages, stack, sampling, **options)])  # type: ignore[arg-type]


def ask(i: int) -> list[ChatMessage]:
    return [ChatMessage("user", f"Question {i}: " + "why is the sky blue? " * (1 + i % 3))]


def step_batches(engine: Engine) -> float:
    return engine.stats().max_step_batch_size


def test_a_seeded_request_says_the_same_alone_and_among_strangers(any_backend: Any, stacks: list[LoraStack | None]) -> None:
    backend = any_backend
    mine = Sampling(temperature=0.9, top_p=0.95, max_tokens=24, seed=11)

    async def run() -> tuple[tuple[str, Finish], tuple[str, Finish], int]:
        async with Engine(backend) as engine:
            alone = await collect(engine, ask(0), stacks[5], mine)
            strangers = [
                collect(engine, ask(i), stacks[i], Sampling(temperature=1.0, max_tokens=30 + i, seed=100 + i))
                for i in range(1, 8)
            ]
            crowded, *_ = await asyncio.gather(collect(engine, ask(0), stacks[5], mine), *strangers)
            return alone, crowded, step_batches(engine)

    alone, crowded, widest = asyncio.run(run())
    assert widest == 8  # the request really shared its steps with seven others
    assert crowded == alone and alone[0]


def test_a_cancelled_and_a_timed_out_row_leave_and_the_others_are_unchanged(
    any_backend: Any, stacks: list[LoraStack | None]
) -> None:
    backend = any_backend
    greedy = Sampling(max_tokens=40)
    endless = Sampling(max_tokens=1900, temperature=1.0, seed=1)  # far longer than the test

    async def run() -> tuple[list[tuple[str, Finish]], list[tuple[str, Finish]], int, Finish, float]:
        async with Engine(backend) as engine:
            alone = [await collect(engine, ask(i), stacks[i], greedy) for i in range(3)]
            cancelled_tokens = 0

            async def cancelled() -> None:
                nonlocal cancelled_tokens
                events = engine.stream(ask(3), stacks[3], endless)
                async for event in events:
                    cancelled_tokens += isinstance(event, Token)
                    if cancelled_tokens == 2:
                        break
                await events.aclose()

            *together, _, (_, timed_out) = await asyncio.gather(
                *(collect(engine, ask(i), stacks[i], greedy) for i in range(3)),
                cancelled(),
                collect(engine, ask(4), stacks[4], endless, timeout=0.3),
            )
            # Rows that left are out of the batch before the next request: it runs alone.
            await collect(engine, ask(0), None, Sampling(max_tokens=2))
            cancelled_count = engine.metrics.registry.get_sample_value("genome_inference_requests_total", {"reason": "cancelled"})
            return alone, together, cancelled_tokens, timed_out, cancelled_count or 0.0

    alone, together, cancelled_tokens, timed_out, cancelled_count = asyncio.run(run())
    assert together == alone
    assert cancelled_tokens == 2 and cancelled_count == 1.0
    assert timed_out.reason == "error" and timed_out.error == "request timed out after 0.3 s"


def test_the_kv_budget_keeps_a_long_prompt_from_sharing_a_batch(backend: TorchBackend) -> None:
    long = [ChatMessage("user", "Describe the ocean. " * 40)]
    short = Sampling(max_tokens=6)

    async def run(budget: int) -> tuple[int, list[Finish]]:
        async with Engine(backend, max_batch_tokens=budget) as engine:
            outcomes = await asyncio.gather(collect(engine, long, None, short), collect(engine, ask(1), None, short))
            return step_batches(engine), [finish for _, finish in outcomes]

    length = len(backend.encode_chat(long))
    tight, finishes = asyncio.run(run(length + 8))  # room for the long prompt alone, not beside another
    assert tight == 1 and [f.reason for f in finishes] == ["length", "length"]
    roomy, _ = asyncio.run(run(4 * length))
    assert roomy == 2


def test_a_higher_priority_request_is_admitted_first(backend: TorchBackend) -> None:
    async def run() -> list[str]:
        async with Engine(backend, max_batch=1) as engine:
            done: list[str] = []

            async def finish(name: str, priority: int) -> None:
                await collect(engine, ask(1), None, Sampling(max_tokens=4), priority=priority)
                done.append(name)

            # One row at a time, all queued in this same tick: the first pick is the highest.
            await asyncio.gather(finish("low", 0), finish("high", 5), finish("low2", 0))
            return done

    assert asyncio.run(run()) == ["high", "low", "low2"]


def test_the_engine_reports_batches_unions_and_queue_waits_per_label(
    backend: TorchBackend, stacks: list[LoraStack | None]
) -> None:
    async def run() -> Engine:
        async with Engine(backend) as engine:
            await asyncio.gather(*(
                collect(engine, ask(i), stacks[i], Sampling(max_tokens=8), label=f"persona-{i % 2}") for i in range(6)
            ))  # fmt: skip
            return engine

    engine = asyncio.run(run())
    stats = engine.stats()
    assert stats.mode == "batching" and stats.max_step_batch_size > 1 and stats.decode_steps > 0
    assert stats.union_rebuilds >= 6 and stats.batch_size == 0 and stats.active_requests == 0
    assert [(entry.label, entry.requests, entry.completion_tokens) for entry in engine.label_stats()] == [
        ("persona-0", 3, 24), ("persona-1", 3, 24),
    ]  # fmt: skip
    registry = engine.metrics.registry
    assert registry.get_sample_value("genome_inference_step_batch_size_count") == stats.decode_steps
    assert registry.get_sample_value("genome_inference_queue_wait_seconds_count") == 6
    assert registry.get_sample_value("genome_inference_union_rebuilds_total") == stats.union_rebuilds
    assert registry.get_sample_value("genome_inference_batch_size") == 0


def test_a_personas_next_turn_reuses_its_prompt_prefix_inside_the_batch(
    backend: TorchBackend, stacks: list[LoraStack | None]
) -> None:
    first = [ChatMessage("system", "You are a patient teacher of geography. " * 3), ChatMessage("user", "Where is Peru?")]
    reply = Sampling(max_tokens=6)

    async def run() -> tuple[int, int]:
        async with Engine(backend) as engine:
            answer, _ = await collect(engine, first, stacks[2], reply)
            before = backend.prompt_cache.reused_tokens
            second = [*first, ChatMessage("assistant", answer), ChatMessage("user", "And Chile?")]
            # The next turn runs beside another persona's request: it joins a batch, prefix reused.
            await asyncio.gather(collect(engine, second, stacks[2], reply), collect(engine, ask(5), stacks[5], Sampling(max_tokens=30)))
            return before, backend.prompt_cache.reused_tokens

    before, after = asyncio.run(run())
    system_tokens = len(backend.encode_chat(first[:1]))
    assert after - before >= system_tokens - 8  # at least the shared system prompt was not computed again
