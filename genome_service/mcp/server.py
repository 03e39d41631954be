"""Genome Service over the Model Context Protocol (the official `mcp` SDK's `MCPServer`).

Every tool calls the same feature-service operation as its REST route, as the same caller
and under the same access rules; a refusal comes back as a tool error whose text is JSON
naming the REST API's rule: ``{"rule": ..., "status": ..., "detail": ...}``. Service calls
block (the database, the embedder), so each runs on a worker thread, as the REST handlers
that embed text do; chat is asynchronous through the process's one inference engine.

Long work returns at once: starting an Academy session appends it and answers with its
id; a worker (``serve``'s own, or ``genome-service academy worker``) trains it, and
``get_academy_session`` reports its progress.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from typing import Annotated, Any, TypeVar

import anyio
import msgspec
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ResourceError, ToolError
from mcp_types import ToolAnnotations
from pydantic import BaseModel, Field, ValidationError

from genome_service.chat.runtime import ChatRuntime
from genome_service.chat.service import AskedMessage, Chat, ChatAsk
from genome_service.domain.layer import TraitType
from genome_service.services.academy_sessions import AcademySessions
from genome_service.services.bootstrap import Services
from genome_service.services.context import Caller, Command, command_metadata
from genome_service.services.conversations import Conversations
from genome_service.services.genomes import Genomes
from genome_service.services.knowledge import KnowledgeBase
from genome_service.services.layers import Layers
from genome_service.services.personas import Personas
from genome_service.services.refusals import refusal
from genome_service.services.search import LayerDiscovery, LayerQuery

T = TypeVar("T")
CallerOf = Callable[[Context], Caller]

INSTRUCTIONS = (
    "Genome Service keeps personas (a system prompt and a genome: an ordered, weighted stack of LoRA layers on a "
    "base model), their knowledge (texts retrieved into chats), a catalogue of layers, and an Academy that trains "
    "new layers. Chat with a persona to get its answer and the knowledge it cited. Academy sessions run in the "
    "background: start one, then poll get_academy_session."
)
READ = ToolAnnotations(read_only_hint=True, idempotent_hint=True, open_world_hint=False)
WRITE = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
REPLACE = ToolAnnotations(read_only_hint=False, destructive_hint=True, idempotent_hint=True, open_world_hint=False)
# Chatting records the turn in a conversation, and the model samples: neither read-only nor idempotent.
CHAT = ToolAnnotations(read_only_hint=False, destructive_hint=False, idempotent_hint=False, open_world_hint=False)
MAX_TAIL = 100


class Features(msgspec.Struct, frozen=True):
    """The feature services the tools call, one instance each."""

    personas: Personas
    genomes: Genomes
    layers: Layers
    knowledge: KnowledgeBase
    discovery: LayerDiscovery
    sessions: AcademySessions
    chat: Chat
    conversations: Conversations


def features_of(services: Services, runtime: ChatRuntime) -> Features:
    """One instance of each feature service, on ``services``; chat on ``runtime``'s engine."""
    return Features(
        personas=Personas(services), genomes=Genomes(services), layers=Layers(services), knowledge=KnowledgeBase(services),
        discovery=LayerDiscovery(services), sessions=AcademySessions(services), chat=Chat(services, runtime),
        conversations=Conversations(services),
    )


def _error_text(rule: str, status: int, detail: str) -> str:
    return json.dumps({"rule": rule, "status": status, "detail": detail})


class GenomeMCPServer(MCPServer):
    """Tool errors name the REST API's rule: a refused operation its own, arguments that do not
    fit a tool's schema ``invalid_arguments`` (with the fields, never the values sent)."""

    async def call_tool(self, name: str, arguments: dict[str, Any], context: Context | None = None) -> Any:
        try:
            return await super().call_tool(name, arguments, context)
        except ToolError as error:
            cause = error.__cause__
            if isinstance(cause, ValidationError):
                fields = sorted({".".join(str(part) for part in e["loc"]) for e in cause.errors()})
                raise ToolError(_error_text("invalid_arguments", 400, f"{name}: invalid {', '.join(fields)}")) from None
            found = refusal(cause) if cause is not None else None
            if found is None:
                raise
            raise ToolError(_error_text(found.rule, found.status, found.detail)) from None


async def _blocking(call: Callable[[], T]) -> T:
    """A service call on a worker thread: the database and the embedder block."""
    return await anyio.to_thread.run_sync(call)


def _plain(value: Any) -> dict[str, Any]:
    return msgspec.to_builtins(value)  # type: ignore[no-any-return]


def build(features: Features, caller_of: CallerOf) -> MCPServer:
    """The MCP server over ``features``; ``caller_of`` says who makes a request (its key's owner)."""
    server = _quietly(lambda: GenomeMCPServer("genome-service", instructions=INSTRUCTIONS))
    _persona_tools(server, features, caller_of)
    _knowledge_tools(server, features, caller_of)
    _layer_tools(server, features, caller_of)
    _academy_tools(server, features, caller_of)
    _resources(server, features, caller_of)
    return server


def _quietly(make: Callable[[], T]) -> T:
    """``make()`` without the SDK's ``logging.basicConfig``: the process's logging is its host's
    (uvicorn's, the CLI's) to configure, and a root handler present makes basicConfig a no-op."""
    root = logging.getLogger()
    guard = logging.NullHandler()
    root.addHandler(guard)
    try:
        return make()
    finally:
        root.removeHandler(guard)


def _command(caller_of: CallerOf, ctx: Context, operation: str) -> Command:
    caller = caller_of(ctx)
    return Command(caller, command_metadata(caller.owner, f"mcp:{operation}"))


Id = Annotated[str, Field(description="The resource's id.")]


class StackEntry(BaseModel):
    layer_id: str
    weight: float = Field(1.0, description="0..1")


def _persona_tools(server: MCPServer, f: Features, caller_of: CallerOf) -> None:
    @server.tool(annotations=READ)
    async def list_personas(
        ctx: Context, limit: Annotated[int, Field(ge=1, le=200)] = 50, cursor: str | None = None,
    ) -> dict[str, Any]:
        """List your personas, oldest first, a page at a time (pass next_cursor back as cursor for the next page)."""
        return _plain(await _blocking(lambda: f.personas.list(caller_of(ctx), limit=limit, cursor=cursor)))

    @server.tool(annotations=READ)
    async def get_persona(ctx: Context, persona_id: Id) -> dict[str, Any]:
        """One of your personas: its name, system prompt and the genome it speaks with."""
        return _plain(await _blocking(lambda: f.personas.get(caller_of(ctx), persona_id)))

    @server.tool(annotations=CHAT)
    async def chat(
        ctx: Context, persona_id: Id, message: str, conversation_id: str | None = None,
        max_tokens: Annotated[int | None, Field(ge=1)] = None, temperature: Annotated[float, Field(ge=0, le=100)] = 0.0,
        seed: int | None = None, context_k: Annotated[int | None, Field(ge=0)] = None,
    ) -> dict[str, Any]:
        """Ask a persona: its reply (generated with its LoRA stack, from its knowledge) and the knowledge chunks it
        cited. Pass conversation_id back to continue the conversation."""
        ask = ChatAsk(messages=[AskedMessage("user", message)], conversation_id=conversation_id, max_tokens=max_tokens,
                      temperature=temperature, seed=seed, context_k=context_k)
        command = _command(caller_of, ctx, "chat")
        reply = await f.chat.reply(await f.chat.start(command.caller, persona_id, ask, command.metadata))
        generation = reply.generation
        return {"conversation_id": reply.conversation_id, "reply": reply.content, "finish_reason": generation.finish_reason,
                "citations": _plain(generation.citations), "stack_hash": generation.stack_hash}


def _knowledge_tools(server: MCPServer, f: Features, caller_of: CallerOf) -> None:
    @server.tool(annotations=WRITE)
    async def add_knowledge(ctx: Context, persona_id: Id, text: str, title: str = "note") -> dict[str, Any]:
        """Add a text to a persona's knowledge: chunked, embedded and retrievable in its chats at once."""
        command = _command(caller_of, ctx, "add_knowledge")
        return _plain(await _blocking(lambda: f.knowledge.add(command, persona_id, text, title=title)))

    @server.tool(annotations=READ)
    async def search_knowledge(ctx: Context, persona_id: Id, query: str, k: int = 5) -> dict[str, Any]:
        """The chunks of a persona's knowledge most similar to the query, best first, with cosine similarities."""
        found = await _blocking(lambda: f.knowledge.search(caller_of(ctx), persona_id, query, k=k))
        return {"items": [{"id": p.id, "knowledge_id": p.knowledge_id, "text": p.text, "cosine_similarity": p.score,
                           "tokens": p.tokens} for p in found]}


def _layer_tools(server: MCPServer, f: Features, caller_of: CallerOf) -> None:
    @server.tool(annotations=READ)
    async def search_layers(
        ctx: Context, text: str | None = None, like_layer_id: str | None = None, k: int = 10,
        trait_type: TraitType | None = None, base_model: str | None = None,
    ) -> dict[str, Any]:
        """Find LoRA layers you may use (yours and public ones) most similar to a text, or to another layer
        (like_layer_id, itself left out): give exactly one of the two. Scores are cosine similarities."""
        query = LayerQuery(text=text, like_layer_id=like_layer_id, k=k, trait_type=trait_type, base_model=base_model)
        matches = await _blocking(lambda: f.discovery.find(caller_of(ctx), query))
        return {"items": [{"cosine_similarity": m.score, "layer": _plain(m.layer)} for m in matches.items]}

    @server.tool(annotations=READ)
    async def get_genome(ctx: Context, genome_id: Id) -> dict[str, Any]:
        """A genome: its base model and its ordered, weighted stack of layers (position 0 at the bottom)."""
        return _plain(await _blocking(lambda: f.genomes.get(caller_of(ctx), genome_id)))

    @server.tool(annotations=REPLACE)
    async def set_genome_stack(ctx: Context, genome_id: Id, layers: list[StackEntry]) -> dict[str, Any]:
        """Replace a genome's whole stack in one change: layers in order (bottom first), each with its weight
        (0..1). An empty list removes every layer."""
        stack = [(item.layer_id, item.weight) for item in layers]
        command = _command(caller_of, ctx, "set_genome_stack")
        return _plain(await _blocking(lambda: f.genomes.replace_layers(command, genome_id, stack)))


def _academy_tools(server: MCPServer, f: Features, caller_of: CallerOf) -> None:
    @server.tool(annotations=WRITE)
    async def start_academy_session(
        ctx: Context, persona_id: Id, goal: str, budget_steps: Annotated[int, Field(ge=1, le=100_000)] = 100,
        budget_seconds: Annotated[float, Field(gt=0, le=86_400)] = 3600.0, target_similarity: float = 0.95,
    ) -> dict[str, Any]:
        """Start training a new layer for a persona towards a goal. Returns at once with the session's id: an
        academy worker trains it in the background; poll get_academy_session for its progress."""
        command = _command(caller_of, ctx, "start_academy_session")
        return _plain(await _blocking(lambda: f.sessions.start(
            command, persona_id, goal, target_similarity=target_similarity, budget_steps=budget_steps,
            budget_seconds=budget_seconds,
        )))

    @server.tool(annotations=READ)
    async def get_academy_session(
        ctx: Context, session_id: Id, events: Annotated[int, Field(ge=0, le=MAX_TAIL)] = 10,
    ) -> dict[str, Any]:
        """An Academy session's status, training step and latest loss, and its last events."""
        caller = caller_of(ctx)
        session, history = await _blocking(lambda: (f.sessions.get(caller, session_id), f.sessions.history(caller, session_id)))
        return {"session": _plain(session), "events": _plain(history[len(history) - events:] if events else [])}

    @server.tool(annotations=REPLACE)
    async def cancel_academy_session(ctx: Context, session_id: Id) -> dict[str, Any]:
        """Cancel a pending or running Academy session; its worker stops within seconds. A finished one is refused."""
        command = _command(caller_of, ctx, "cancel_academy_session")
        return _plain(await _blocking(lambda: f.sessions.cancel(command, session_id)))


def _resources(server: MCPServer, f: Features, caller_of: CallerOf) -> None:
    async def read(call: Callable[[], Any]) -> str:
        try:
            return msgspec.json.encode(await anyio.to_thread.run_sync(call)).decode()
        except Exception as error:
            found = refusal(error)
            if found is None:
                raise
            raise ResourceError(_error_text(found.rule, found.status, found.detail)) from None

    @server.resource("persona://{persona_id}", mime_type="application/json")
    async def persona(persona_id: str, ctx: Context) -> str:
        """One of your personas."""
        return await read(lambda: f.personas.get(caller_of(ctx), persona_id))

    @server.resource("persona://{persona_id}/genome", mime_type="application/json")
    async def persona_genome(persona_id: str, ctx: Context) -> str:
        """The genome a persona speaks with: its base model and its weighted layer stack."""
        def genome() -> Any:
            caller = caller_of(ctx)
            return f.genomes.get(caller, f.personas.genome_id(caller, persona_id))

        return await read(genome)

    @server.resource("layer://{layer_id}", mime_type="application/json")
    async def layer(layer_id: str, ctx: Context) -> str:
        """A layer you may use: yours, or a public one."""
        return await read(lambda: f.layers.get(caller_of(ctx), layer_id))

    @server.resource("academy://sessions/{session_id}", mime_type="application/json")
    async def academy_session(session_id: str, ctx: Context) -> str:
        """An Academy session: status, training step, latest loss, layers produced."""
        return await read(lambda: f.sessions.get(caller_of(ctx), session_id))
