"""A chat turn on the tiny random Llama: retrieval, prompt assembly, generation and the recorded conversation."""

from __future__ import annotations

import asyncio
import logging
import functools
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import sqlalchemy as sa

from genome_service.chat.prompt import CLOSE, OPEN
from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.turn import ChatRefused, Reply, TurnRequest, run_turn
from genome_service.domain.common import DomainError
from genome_service.domain.conversation import Message
from genome_service.domain.persona import PERSONA, CreatePersona
from genome_service.eventstore.database import Database
from genome_service.eventstore.records import NO_METADATA
from genome_service.projections.tables import CONVERSATION_MESSAGES, CONVERSATIONS
from genome_service.services.bootstrap import Services, build
from genome_service.services.knowledge import add_knowledge
from genome_service.settings import Settings
from inference.backends.base import Token
from inference.models import ModelCatalog
from rag.embedder import SentenceTransformerEmbedder

FACT = "The moon of Quillon is named Vesperine and glows violet at dusk."
OTHER = "Bread is baked from flour, water, salt and yeast in a hot oven."


@pytest.fixture
def chat(database: Database, tmp_path: Path, tiny_model: Path, embedder: SentenceTransformerEmbedder) -> Iterator[Services]:
    ModelCatalog(tmp_path / "models").register_local("tiny", tiny_model)
    settings = Settings(data_dir=tmp_path, database_url=database.url, models_dir=tmp_path / "models", inference_model="tiny",
                        inference_backend="torch", inference_device="cpu")
    services = build(settings, database=database, embedder=embedder)
    services.commands.execute(PERSONA, "p1", CreatePersona("p1", "alice", "Astra", system_prompt="You are Astra, an astronomer."))
    add_knowledge(services, "alice", "p1", "moons", "text/plain", FACT, NO_METADATA)
    add_knowledge(services, "alice", "p1", "bread", "text/plain", OTHER, NO_METADATA)
    yield services


def sync(test: Callable[..., Coroutine[Any, Any, None]]) -> Callable[..., None]:
    """Run an async test body on its own event loop (the engine needs one)."""

    @functools.wraps(test)
    def run(*args: Any, **kwargs: Any) -> None:
        asyncio.run(test(*args, **kwargs))

    return run


def ask(text: str, **overrides: object) -> TurnRequest:
    fields: dict[str, object] = {"persona_id": "p1", "owner": "alice", "messages": (Message("user", text),),
                                 "max_tokens": 8, "context_k": 1}
    return TurnRequest(**(fields | overrides))  # type: ignore[arg-type]


async def collect(events: AsyncIterator[Token | Reply]) -> tuple[list[Token], Reply]:
    tokens: list[Token] = []
    async for event in events:
        if isinstance(event, Reply):
            return tokens, event
        tokens.append(event)
    raise AssertionError("a turn ends with a Reply")


def rows(services: Services) -> list[tuple[object, ...]]:
    with services.database.read() as connection:
        conversations = connection.execute(sa.select(CONVERSATIONS).order_by("conversation_id")).all()
        messages = connection.execute(sa.select(CONVERSATION_MESSAGES).order_by("conversation_id", "ordinal")).all()
    return [tuple(r) for r in (*conversations, *messages)]


@sync
async def test_a_turn_cites_the_retrieved_chunk_and_records_the_whole_turn_at_once(chat: Services) -> None:
    runtime = ChatRuntime(chat)
    try:
        tokens, reply = await collect(run_turn(chat, runtime, ask("What is the moon of Quillon called?"), NO_METADATA))
        loaded = await runtime.ready()
    finally:
        await runtime.close()
    assert reply.content == "".join(t.text for t in tokens)
    generation = reply.generation
    moons = chat.store.read_all(after_position=0)
    knowledge_id = next(e.stream_id for e in moons if e.type == "KnowledgeAdded" and e.event.title == "moons")
    assert [c.chunk_id for c in generation.citations] == [f"{knowledge_id}:0"]
    assert generation.model == "tiny" and generation.stack_hash is None
    assert generation.sampling.max_tokens == 8 and generation.usage.completion_tokens >= len(tokens) >= 1
    assert generation.usage.prompt_tokens > 0 and generation.finish_reason in ("stop", "length", "repetition")
    assert loaded.context == 2048

    events = chat.store.read_stream(reply.conversation_id)
    assert [e.type for e in events] == ["ConversationStarted", "MessageAdded", "MessageAdded"]
    assert len({e.position for e in events}) == 3 and events[1].event.content == "What is the moon of Quillon called?"
    assert events[2].event.generation == generation
    before = rows(chat)
    chat.projector.rebuild()
    assert rows(chat) == before and len(before) == 3


@sync
async def test_a_continued_turn_sees_the_history_and_the_knowledge_only_as_delimited_data(chat: Services) -> None:
    runtime = ChatRuntime(chat)
    try:
        _, first = await collect(run_turn(chat, runtime, ask("Tell me about Quillon."), NO_METADATA))
        loaded = await runtime.ready()
        from genome_service.chat.turn import prepare_turn

        prepared = prepare_turn(chat, loaded, ask("And its moon?", conversation_id=first.conversation_id))
        _, second = await collect(run_turn(chat, runtime, ask("And its moon?", conversation_id=first.conversation_id), NO_METADATA))
    finally:
        await runtime.close()
    system, *history = prepared.prompt.messages
    assert system.role == "system" and system.content.startswith("You are Astra, an astronomer.")
    assert f'{OPEN} id="{prepared.prompt.passages[0].id}">>\n{FACT}\n{CLOSE}' in system.content
    assert [(m.role, m.content) for m in history] == [("user", "Tell me about Quillon."), ("assistant", first.content),
                                                     ("user", "And its moon?")]
    assert second.conversation_id == first.conversation_id
    assert [e.version for e in chat.store.read_stream(first.conversation_id)] == [1, 2, 3, 4, 5]


@sync
async def test_a_caller_that_stops_reading_cancels_generation_and_records_nothing(chat: Services) -> None:
    runtime = ChatRuntime(chat)
    try:
        events = run_turn(chat, runtime, ask("Count to a thousand.", max_tokens=500), NO_METADATA)
        first = await anext(events)
        assert isinstance(first, Token)
        await events.aclose()
        engine = (await runtime.ready()).engine
        cancelled = await poll(lambda: engine.metrics.registry.get_sample_value(
            "genome_inference_requests_total", {"reason": "cancelled"}))
    finally:
        await runtime.close()
    assert cancelled == 1
    assert not [e for e in chat.store.read_all(after_position=0) if e.stream_type == "conversation"]


async def poll(value: Callable[[], float | None], seconds: float = 30.0) -> float | None:
    """The value once it is set, or None after ``seconds``."""
    deadline = asyncio.get_running_loop().time() + seconds
    while (current := value()) is None or current == 0:
        if asyncio.get_running_loop().time() > deadline:
            return None
        await asyncio.sleep(0.01)
    return current


@sync
async def test_refused_turns_append_nothing(chat: Services) -> None:
    runtime = ChatRuntime(chat)
    before = chat.store.last_position()
    try:
        with pytest.raises(ChatRefused) as too_long:
            await collect(run_turn(chat, runtime, ask("word " * 5000), NO_METADATA))
        with pytest.raises(ChatRefused) as over_context:
            await collect(run_turn(chat, runtime, ask("hi", max_tokens=2048), NO_METADATA))
        with pytest.raises(DomainError) as empty:
            await collect(run_turn(chat, runtime, ask(" "), NO_METADATA))
        with pytest.raises(DomainError) as unknown:
            await collect(run_turn(chat, runtime, ask("hi", conversation_id="nope"), NO_METADATA))
        with pytest.raises(DomainError) as no_persona:
            await collect(run_turn(chat, runtime, ask("hi", persona_id="ghost"), NO_METADATA))
    finally:
        await runtime.close()
    assert too_long.value.rule == "prompt_too_long" and too_long.value.status == 422
    assert over_context.value.rule == "max_tokens_out_of_range"
    assert (empty.value.rule, unknown.value.rule, no_persona.value.rule) == (
        "message_required", "conversation_not_found", "persona_not_found")
    assert chat.store.last_position() == before


@sync
async def test_a_turn_past_its_timeout_ends_as_a_timeout_and_records_nothing(chat: Services) -> None:
    hasty = msgspec.structs.replace(chat, settings=msgspec.structs.replace(chat.settings, chat_timeout=1e-4))
    runtime = ChatRuntime(hasty)
    try:
        _, reply = await collect(run_turn(hasty, runtime, ask("hello", max_tokens=200), NO_METADATA))
    finally:
        await runtime.close()
    assert reply.failure is not None and (reply.failure.status, reply.failure.rule) == (503, "generation_timed_out")
    assert not [e for e in chat.store.read_all(after_position=0) if e.stream_type == "conversation"]


@sync
async def test_prompts_and_replies_stay_out_of_logs_at_info_and_above(chat: Services, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    runtime = ChatRuntime(chat)
    try:
        _, reply = await collect(run_turn(chat, runtime, ask("Whisper the secret word zanzibarite."), NO_METADATA))
    finally:
        await runtime.close()
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]
    assert reply.content and not [m for m in logged if "zanzibarite" in m or reply.content in m or FACT in m]
