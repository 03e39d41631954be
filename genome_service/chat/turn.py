"""One chat turn: retrieve -> assemble the prompt -> generate with the persona's stack -> record.

The conversation is appended once, when the reply is finished (stop, length or a
repetition stop), as one atomic append of the caller's messages and the reply. A
caller that goes away, a timeout or a backend error records nothing, so no
conversation ever holds a question without its answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import aclosing

import msgspec

from genome_service.chat.prompt import Prompt, PromptTooLong, assemble, fit_history
from genome_service.chat.runtime import ChatRuntime, Loaded, persona_label
from genome_service.domain.conversation import (
    CONVERSATION,
    Citation,
    Generation,
    Message,
    RecordTurn,
    SamplingUsed,
    Usage,
    validate_asked,
)
from genome_service.eventstore.records import EventMetadata
from genome_service.services.bootstrap import Services
from genome_service.services.conversations import Conversations
from genome_service.services.creation import new_id
from inference.backends.base import ChatMessage, Finish, Sampling, Token
from inference.daemon.client import DaemonRefused
from inference.daemon.protocol import StackEntry
from inference.engine import QueueFull
from inference.lora.stack import LoraStack, stack_key
from rag.retriever import Passage, select

# Nearest chunks fetched per passage wanted, so the token budget can pass over long ones.
CANDIDATES_PER_PASSAGE = 4
CLEAN_ENDS = ("stop", "length", "repetition")


class ChatRefused(Exception):
    """A turn the service will not run as asked; ``rule`` names why, ``status`` is its HTTP status."""

    def __init__(self, status: int, rule: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.rule = rule


class TurnRequest(msgspec.Struct, frozen=True, kw_only=True):
    persona_id: str
    owner: str
    messages: tuple[Message, ...]  # the caller's new messages, the last from the user
    conversation_id: str | None = None  # continue this one; None starts a new one
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    context_k: int


class Reply(msgspec.Struct, frozen=True):
    """A finished turn as recorded; a failed one (``failure`` set) is not recorded."""

    conversation_id: str
    content: str
    generation: Generation
    failure: ChatRefused | None = None
    worker_pid: int | None = None  # the inference daemon's worker that generated it, if one did


class _Prepared(msgspec.Struct, frozen=True):
    request: TurnRequest
    conversation_id: str
    prompt: Prompt
    stack: LoraStack | list[StackEntry] | None
    stack_hash: str | None
    sampling: Sampling
    loaded: Loaded


async def run_turn(services: Services, runtime: ChatRuntime, request: TurnRequest, metadata: EventMetadata) -> AsyncIterator[Token | Reply]:
    """Yield the reply's Tokens as they come, then one Reply (recorded if the turn finished cleanly).

    Refusals (``ChatRefused``, ``DomainError``) are raised before the first token.
    Closing the iterator early cancels generation and records nothing.
    """
    validate_asked(request.messages)  # before loading a model for a request that cannot run
    model = await asyncio.to_thread(runtime.model_of, request.persona_id)
    loaded = await runtime.ready(model)
    prepared = await asyncio.to_thread(prepare_turn, services, loaded, request)
    events = engine_events(loaded, list(prepared.prompt.messages), prepared.stack, prepared.sampling,
                           persona_label(request.owner, request.persona_id))
    parts: list[str] = []
    async with aclosing(events) as stream:  # closing it is what cancels generation
        async for event in stream:
            if isinstance(event, Token):
                parts.append(event.text)
                yield event
                continue
            yield await _finish(services, prepared, "".join(parts), event, metadata)


async def engine_events(loaded: Loaded, messages: list[ChatMessage], stack: LoraStack | list[StackEntry] | None,
                        sampling: Sampling, label: str) -> AsyncIterator[Token | Finish]:
    """One generation's events from the loaded engine; its refusals (a full queue, the daemon's,
    all before the first token) as `ChatRefused`. Closing it cancels the generation."""
    try:
        events = loaded.engine.stream(messages, stack, sampling, label=label)  # type: ignore[arg-type]
    except QueueFull as error:
        raise ChatRefused(429, "inference_busy", str(error)) from None
    async with aclosing(events) as stream:
        try:
            async for event in stream:
                yield event
        except DaemonRefused as error:
            raise ChatRefused(error.status, error.rule, str(error)) from None


async def _finish(services: Services, prepared: _Prepared, content: str, finish: Finish, metadata: EventMetadata) -> Reply:
    request, sampling = prepared.request, prepared.sampling
    generation = Generation(
        model=prepared.loaded.model,
        stack_hash=prepared.stack_hash,
        sampling=SamplingUsed(sampling.temperature, sampling.top_p, sampling.max_tokens, sampling.seed),
        usage=Usage(finish.prompt_tokens or prepared.prompt.tokens, finish.completion_tokens),
        finish_reason=finish.reason,
        citations=tuple(Citation(p.id, round(p.score, 6)) for p in prepared.prompt.passages),
    )
    if finish.reason not in CLEAN_ENDS:
        # The engine (and the daemon) name a timeout's rule; any other failure is a failed generation.
        rule = finish.rule or "generation_failed"
        return Reply(prepared.conversation_id, content, generation, ChatRefused(503, rule, finish.error or finish.reason),
                     finish.worker_pid)
    command = RecordTurn(prepared.conversation_id, request.persona_id, request.owner, request.messages,
                         Message("assistant", content, generation))
    await asyncio.to_thread(services.commands.execute, CONVERSATION, prepared.conversation_id, command, metadata=metadata)
    return Reply(prepared.conversation_id, content, generation, worker_pid=finish.worker_pid)


def prepare_turn(services: Services, loaded: Loaded, request: TurnRequest) -> _Prepared:
    """Everything before the first token; runs in a worker thread (database, embedder, tokenizer)."""
    if request.max_tokens >= loaded.context:
        raise ChatRefused(422, "max_tokens_out_of_range", f"max_tokens must be below the model's context of {loaded.context}")
    try:
        sampling = Sampling(temperature=request.temperature, top_p=request.top_p, max_tokens=request.max_tokens, seed=request.seed)
    except ValueError as error:
        raise ChatRefused(422, "sampling_out_of_range", str(error)) from None
    system_prompt, layers = loaded.resolver.persona(request.persona_id)
    conversation_id, history = _history(services, request)
    budget = loaded.context - request.max_tokens
    try:
        history = fit_history(system_prompt, history, loaded.count_prompt, budget)
        room = budget - loaded.count_prompt([ChatMessage("system", system_prompt), *history])
        passages = _retrieve(services, request, loaded, room) if request.context_k and room > 0 else []
        prompt = assemble(system_prompt, passages, history, loaded.count_prompt, budget)
    except PromptTooLong as error:
        raise ChatRefused(422, "prompt_too_long", str(error)) from None
    stack = loaded.resolver.stack(layers)
    return _Prepared(request, conversation_id, prompt, stack, stack_key(layers) if stack is not None else None, sampling, loaded)


def _history(services: Services, request: TurnRequest) -> tuple[str, list[ChatMessage]]:
    new = [ChatMessage(m.role, m.content) for m in request.messages]
    if request.conversation_id is None:
        return new_id(), new
    before = Conversations(services).history(request.owner, request.persona_id, request.conversation_id)
    return request.conversation_id, [ChatMessage(m.role, m.content) for m in before] + new


def _retrieve(services: Services, request: TurnRequest, loaded: Loaded, room: int) -> list[Passage]:
    """The persona's chunks nearest the newest user message, best first, within ``room`` tokens."""
    search = services.search
    if not search.has_knowledge(request.persona_id):
        return []
    query = search.query_vector(request.messages[-1].content)
    candidates = search.knowledge_candidates(query, request.context_k * CANDIDATES_PER_PASSAGE, request.persona_id)
    return select(candidates, k=request.context_k, token_budget=room, count_tokens=loaded.count_text)

