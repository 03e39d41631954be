"""The MCP server, spoken to with the SDK's own client: over streamable HTTP inside the real server
process (two workers, bearer keys) and over stdio (`genome-service mcp`); every tool, the resources,
refusals as tool errors with the REST rules, and nothing appended by a refused call."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
import httpx
import httpx2
import pytest
from mcp import ClientSession
from mcp.client.stdio import StdioServerParameters, stdio_client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError
from servers import CLI, Server
from test_layers_api import upload

from fixtures.make_adapter import make_adapter_files
from fixtures.make_model import tiny_spec
from inference.models import ModelCatalog

MODEL = "tiny-llama"
FACT = "The moon of Quillon is named Vesperine. Vesperine glows violet at dusk and was charted by Ilsa Marrow."
OTHER = "Sourdough bread rises slowly because wild yeast ferments the dough overnight."
QUESTION = "What is the name of the moon of Quillon?"

TOOLS = {"list_personas", "get_persona", "chat", "add_knowledge", "search_knowledge", "search_layers", "get_genome",
         "set_genome_stack", "start_academy_session", "get_academy_session", "cancel_academy_session"}
READ_ONLY = {"list_personas", "get_persona", "search_knowledge", "search_layers", "get_genome", "get_academy_session"}
WRITES = TOOLS - READ_ONLY
DESTRUCTIVE = {"set_genome_stack", "cancel_academy_session"}
TEMPLATES = {"persona://{persona_id}", "persona://{persona_id}/genome", "layer://{layer_id}",
             "academy://sessions/{session_id}"}


def tiny_model_server(start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path, **settings: str) -> Server:
    """A server whose inference runs the tiny random model on the CPU, registered before it starts."""
    ModelCatalog(tmp_path / "models").register_local(MODEL, tiny_model)
    return start_server(models_dir=str(tmp_path / "models"), inference_model=MODEL, inference_device="cpu",
                        inference_backend="torch", **settings)


def await_workers(server: Server) -> None:
    """With several workers uvicorn says it is running once the parent has bound the port, before a
    worker listens on it: connecting is refused until one does. httpx's connect retries back off."""
    with httpx.Client(base_url=server.url, transport=httpx.HTTPTransport(retries=6)) as client:
        assert client.get("/ready").status_code == 200


def seed_persona(client: httpx.Client, base_model: str = MODEL, name: str = "Astra") -> dict[str, Any]:
    """A persona with its genome on `base_model`, made over REST (MCP has no tool that creates one)."""
    created = client.post("/personas/", json={"name": name, "system_prompt": "You are Astra, a careful astronomer.",
                                              "base_model": base_model})
    assert created.status_code == 201, created.text
    return created.json()


def seed_layer(client: httpx.Client, tiny_model: Path | None = None) -> dict[str, Any]:
    """A layer for the tiny model (or the default model without one) that a text search can find."""
    files = make_adapter_files("peft", spec=tiny_spec(tiny_model, MODEL)) if tiny_model else make_adapter_files("peft")
    details: dict[str, Any] = {"name": "stargazer voice", "description": "speaks like a calm astronomer about moons",
                               "trait_type": "tone_and_voice", "tags": ["astronomy"]}
    if tiny_model:
        details["base_model"] = MODEL
    created = upload(client, files, **details)
    assert created.status_code == 201, created.text
    return created.json()


def last_position(server: Server) -> int:
    with server.client() as client:
        return client.get("/ready").json()["last_position"]


@asynccontextmanager
async def over_http(server: Server, key: str | None = None, initialize: bool = True) -> AsyncIterator[ClientSession]:
    headers = {"Authorization": f"Bearer {key}"} if key else None
    async with (
        httpx2.AsyncClient(headers=headers, timeout=httpx2.Timeout(30, read=120)) as http,
        streamable_http_client(f"{server.url}/mcp", http_client=http) as (read, write),
        ClientSession(read, write) as session,
    ):
        if initialize:
            await session.initialize()
        yield session


@asynccontextmanager
async def over_stdio(server: Server, errlog: Path, *args: str) -> AsyncIterator[ClientSession]:
    command = StdioServerParameters(command=CLI[0], args=[*CLI[1:], "mcp", *args], env=server.env)
    with errlog.open("w") as log:
        async with stdio_client(command, errlog=log) as (read, write), ClientSession(read, write) as session:
            await session.initialize()
            yield session


async def call(session: ClientSession, tool: str, **arguments: Any) -> dict[str, Any]:
    """The tool's structured result, which its text content repeats as JSON."""
    result = await session.call_tool(tool, arguments)
    assert not result.is_error, result.content
    assert isinstance(result.structured_content, dict), result
    assert json.loads(result.content[0].text) == result.structured_content  # type: ignore[union-attr]
    return result.structured_content


async def refused(session: ClientSession, tool: str, rule: str, status: int, **arguments: Any) -> None:
    """The call is a tool error whose first text is the REST problem's rule and status."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool}({arguments}) was not refused: {result.structured_content}"
    problem = json.loads(result.content[0].text)  # type: ignore[union-attr]
    assert (problem["rule"], problem["status"]) == (rule, status), problem
    assert problem["detail"]


async def invalid(session: ClientSession, tool: str, **arguments: Any) -> None:
    """Arguments that do not fit the tool's schema: a tool error (the spec leaves its wording to the SDK)."""
    result = await session.call_tool(tool, arguments)
    assert result.is_error, f"{tool}({arguments}) was accepted: {result.structured_content}"
    assert result.structured_content is None, result.structured_content


async def read_json(session: ClientSession, uri: str) -> dict[str, Any]:
    [contents] = (await session.read_resource(uri)).contents
    return json.loads(contents.text)  # type: ignore[union-attr]


def test_over_http_an_agent_finds_tools_chats_with_cited_knowledge_searches_reads_and_runs_the_academy(
    start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path,
) -> None:
    server = tiny_model_server(start_server, tiny_model, tmp_path, workers="2")
    await_workers(server)
    with server.client() as client:
        persona = seed_persona(client)
        layer = seed_layer(client, tiny_model)

    async def session() -> str:
        async with over_http(server) as mcp:
            tools = {tool.name: tool for tool in (await mcp.list_tools()).tools}
            assert TOOLS <= set(tools), sorted(tools)
            for name in READ_ONLY:
                assert tools[name].annotations is not None and tools[name].annotations.read_only_hint is True, name
            for name in WRITES:
                assert tools[name].annotations is None or not tools[name].annotations.read_only_hint, name
            for name in DESTRUCTIVE:
                assert tools[name].annotations.destructive_hint is True, name  # type: ignore[union-attr]
            templates = {t.uri_template for t in (await mcp.list_resource_templates()).resource_templates}
            assert TEMPLATES <= templates, templates
            resources = (await mcp.list_resources()).resources
            assert all(str(r.uri).partition(":")[0] in {"persona", "layer", "academy"} for r in resources), resources

            listed = await call(mcp, "list_personas")
            assert [p["id"] for p in listed["items"]] == [persona["id"]] and listed["next_cursor"] is None
            got = await call(mcp, "get_persona", persona_id=persona["id"])
            assert (got["id"], got["owner"], got["genome_id"]) == (persona["id"], "local", persona["genome_id"])

            fact = await call(mcp, "add_knowledge", persona_id=persona["id"], text=FACT, title="moons")
            assert (fact["persona_id"], fact["title"]) == (persona["id"], "moons") and fact["chunk_count"] >= 1
            await call(mcp, "add_knowledge", persona_id=persona["id"], text=OTHER, title="bread")
            hits = (await call(mcp, "search_knowledge", persona_id=persona["id"], query=QUESTION, k=2))["items"]
            assert len(hits) == 2 and hits[0]["knowledge_id"] == fact["id"] and "Vesperine" in hits[0]["text"]
            assert all(-1 <= hit["cosine_similarity"] <= 1 for hit in hits)

            answer = await call(mcp, "chat", persona_id=persona["id"], message=QUESTION, max_tokens=3, context_k=1)
            assert [c["chunk_id"].rpartition(":")[0] for c in answer["citations"]] == [fact["id"]], answer
            assert isinstance(answer["reply"], str) and answer["finish_reason"] in ("stop", "length")
            again = await call(mcp, "chat", persona_id=persona["id"], message="And who charted it?", max_tokens=2,
                               context_k=0, conversation_id=answer["conversation_id"])
            assert again["conversation_id"] == answer["conversation_id"] and again["citations"] == []

            found = (await call(mcp, "search_layers", text="a calm voice that talks about moons", k=5))["items"]
            [match] = [m for m in found if m["layer"]["id"] == layer["id"]]
            assert -1 <= match["cosine_similarity"] <= 1 and match["layer"]["name"] == "stargazer voice"

            genome = await call(mcp, "get_genome", genome_id=persona["genome_id"])
            assert (genome["id"], genome["persona_id"], genome["base_model"], genome["layers"]) == (
                persona["genome_id"], persona["id"], MODEL, [])
            stacked = await call(mcp, "set_genome_stack", genome_id=genome["id"],
                                 layers=[{"layer_id": layer["id"], "weight": 0.5}])
            assert [(s["layer_id"], s["position"]) for s in stacked["layers"]] == [(layer["id"], 0)]
            assert stacked["layers"][0]["weight"] == pytest.approx(0.5) and stacked["version"] > genome["version"]
            read = await read_json(mcp, f"persona://{persona['id']}/genome")
            assert {k: read[k] for k in ("id", "persona_id", "layers", "version")} == {
                k: stacked[k] for k in ("id", "persona_id", "layers", "version")}
            assert (await read_json(mcp, f"persona://{persona['id']}"))["genome_id"] == genome["id"]
            assert (await read_json(mcp, f"layer://{layer['id']}"))["id"] == layer["id"]

            started = await call(mcp, "start_academy_session", persona_id=persona["id"], goal="Sound calm.", budget_steps=5)
            assert started["status"] == "pending"
            followed = await call(mcp, "get_academy_session", session_id=started["id"], events=5)
            assert followed["session"]["id"] == started["id"]
            assert [e["type"] for e in followed["events"]] == ["AcademySessionStarted"]
            cancelled = await call(mcp, "cancel_academy_session", session_id=started["id"])
            assert (cancelled["id"], cancelled["status"]) == (started["id"], "cancelled")
            assert (await read_json(mcp, f"academy://sessions/{started['id']}"))["status"] == "cancelled"
            await refused(mcp, "cancel_academy_session", "session_finished", 409, session_id=started["id"])
            return answer["conversation_id"]

    conversation_id = anyio.run(session)
    with server.client() as client:  # what the tools did is what REST sees
        conversation = client.get(f"/conversations/{conversation_id}").json()
        assert [m["role"] for m in conversation["messages"]] == ["user", "assistant", "user", "assistant"]
        assert client.get(f"/genomes/{persona['genome_id']}").json()["layers"][0]["layer_id"] == layer["id"]


def test_over_stdio_the_same_tools_answer_for_the_local_owner(
    start_server: Callable[..., Server], tmp_path: Path,
) -> None:
    server = start_server()  # migrates the database the stdio process shares; the HTTP server only seeds
    with server.client() as client:
        persona = seed_persona(client, base_model="smollm2-135m-instruct")

    async def session() -> None:
        async with over_stdio(server, tmp_path / "mcp-stdio.log") as mcp:
            assert TOOLS <= {tool.name for tool in (await mcp.list_tools()).tools}
            listed = await call(mcp, "list_personas")
            assert [p["id"] for p in listed["items"]] == [persona["id"]]
            got = await call(mcp, "get_persona", persona_id=persona["id"])
            assert (got["owner"], got["genome_id"]) == ("local", persona["genome_id"])

            fact = await call(mcp, "add_knowledge", persona_id=persona["id"], text=FACT, title="moons")
            await call(mcp, "add_knowledge", persona_id=persona["id"], text=OTHER, title="bread")
            hits = (await call(mcp, "search_knowledge", persona_id=persona["id"], query=QUESTION, k=1))["items"]
            assert [hit["knowledge_id"] for hit in hits] == [fact["id"]]

            genome = await call(mcp, "get_genome", genome_id=persona["genome_id"])
            assert (genome["persona_id"], genome["layers"]) == (persona["id"], [])
            assert (await read_json(mcp, f"persona://{persona['id']}/genome"))["id"] == genome["id"]

            started = await call(mcp, "start_academy_session", persona_id=persona["id"], goal="Sound calm.")
            assert started["status"] == "pending"
            cancelled = await call(mcp, "cancel_academy_session", session_id=started["id"])
            assert cancelled["status"] == "cancelled"
            await refused(mcp, "get_persona", "persona_not_found", 404, persona_id="ghost")

    anyio.run(session)
    with server.client() as client:  # the stdio process wrote to the same log the server reads
        sessions = client.get("/academy/sessions/").json()["items"]
        assert [s["status"] for s in sessions] == ["cancelled"]
        assert len(client.get(f"/personas/{persona['id']}/knowledge").json()["items"]) == 2


def test_with_keys_on_mcp_needs_a_live_key_and_sees_only_its_owners_things(
    start_server: Callable[..., Server], tmp_path: Path,
) -> None:
    server = start_server()
    alice, bob, carol = (server.cli("keys", "create", "--owner", who).stdout.strip() for who in ("alice", "bob", "carol"))
    with server.client(alice) as client:
        persona = seed_persona(client, base_model="smollm2-135m-instruct", name="Alice's own")
    hello = {"jsonrpc": "2.0", "id": 1, "method": "initialize",
             "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}}
    bare = httpx.post(f"{server.url}/mcp", json=hello, headers={"Accept": "application/json, text/event-stream"})
    assert bare.status_code == 401 and bare.headers["content-type"].startswith("application/problem+json"), bare.text

    async def sessions() -> None:
        async with over_http(server, initialize=False) as anonymous:
            with pytest.raises(MCPError):
                await anonymous.initialize()
        async with over_http(server, "not-a-key", initialize=False) as unknown:
            with pytest.raises(MCPError):
                await unknown.initialize()

        async with over_http(server, bob) as mcp:
            await refused(mcp, "get_persona", "persona_not_found", 404, persona_id=persona["id"])
            await refused(mcp, "get_genome", "genome_not_found", 404, genome_id=persona["genome_id"])
            assert (await call(mcp, "list_personas"))["items"] == []
        async with over_http(server, alice) as mcp:
            assert (await call(mcp, "get_persona", persona_id=persona["id"]))["owner"] == "alice"
        async with over_stdio(server, tmp_path / "mcp-stdio.log", "--key", bob) as mcp:
            await refused(mcp, "get_persona", "persona_not_found", 404, persona_id=persona["id"])

        async with over_http(server, carol) as mcp:
            assert (await call(mcp, "list_personas"))["items"] == []
            listing = server.cli("keys", "list").stdout.splitlines()
            [carols] = [line.split()[0] for line in listing if line.split()[1] == "carol"]
            assert server.cli("keys", "revoke", carols).returncode == 0
            with pytest.raises(MCPError):
                await mcp.call_tool("list_personas", {})

    anyio.run(sessions)


def test_bad_input_to_each_tool_is_a_tool_error_with_the_rest_rule_and_appends_nothing(
    start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path,
) -> None:
    server = tiny_model_server(start_server, tiny_model, tmp_path)  # a conversation is looked up once the model is loaded
    with server.client() as client:
        persona = seed_persona(client)
        layer = seed_layer(client, tiny_model)
    before = last_position(server)
    p, g = persona["id"], persona["genome_id"]

    async def session() -> None:
        async with over_http(server) as mcp:
            await refused(mcp, "list_personas", "bad_request", 400, cursor="not-a-cursor")
            await invalid(mcp, "list_personas", limit="many")

            await refused(mcp, "get_persona", "persona_not_found", 404, persona_id="ghost")
            await invalid(mcp, "get_persona", persona_id=5)
            await invalid(mcp, "get_persona")

            await refused(mcp, "chat", "persona_not_found", 404, persona_id="ghost", message="hello")
            await refused(mcp, "chat", "message_required", 422, persona_id=p, message="   ")
            await refused(mcp, "chat", "max_tokens_out_of_range", 422, persona_id=p, message="hi", max_tokens=100_000)
            await refused(mcp, "chat", "context_k_out_of_range", 422, persona_id=p, message="hi", context_k=1000)
            await invalid(mcp, "chat", persona_id=p, message="hi", max_tokens=0)  # below the schema's minimum
            await refused(mcp, "chat", "conversation_not_found", 404, persona_id=p, message="hi", conversation_id="nope")
            await invalid(mcp, "chat", persona_id=p, message=7)

            await refused(mcp, "add_knowledge", "persona_not_found", 404, persona_id="ghost", text=FACT)
            await refused(mcp, "add_knowledge", "text_required", 422, persona_id=p, text="   ")
            await invalid(mcp, "add_knowledge", persona_id=p, text=["a", "list"])

            await refused(mcp, "search_knowledge", "persona_not_found", 404, persona_id="ghost", query="moons")
            await refused(mcp, "search_knowledge", "query_text_required", 422, persona_id=p, query="")
            await refused(mcp, "search_knowledge", "k_out_of_range", 422, persona_id=p, query="moons", k=0)
            await refused(mcp, "search_knowledge", "k_out_of_range", 422, persona_id=p, query="moons", k=101)
            await invalid(mcp, "search_knowledge", persona_id=p, query="moons", k="five")

            await refused(mcp, "search_layers", "query_text_required", 422, text="")
            await refused(mcp, "search_layers", "one_query_required", 422)
            await refused(mcp, "search_layers", "one_query_required", 422, text="moons", like_layer_id=layer["id"])
            await refused(mcp, "search_layers", "layer_not_found", 404, like_layer_id="ghost")
            await refused(mcp, "search_layers", "k_out_of_range", 422, text="moons", k=0)
            await invalid(mcp, "search_layers", text=3)

            await refused(mcp, "get_genome", "genome_not_found", 404, genome_id="ghost")
            await invalid(mcp, "get_genome", genome_id=None)

            await refused(mcp, "set_genome_stack", "genome_not_found", 404, genome_id="ghost", layers=[])
            await refused(mcp, "set_genome_stack", "layer_not_found", 404, genome_id=g,
                          layers=[{"layer_id": "ghost", "weight": 1.0}])
            await refused(mcp, "set_genome_stack", "weight_out_of_range", 422, genome_id=g,
                          layers=[{"layer_id": layer["id"], "weight": 7.0}])
            await invalid(mcp, "set_genome_stack", genome_id=g, layers="everything")

            await refused(mcp, "start_academy_session", "persona_not_found", 404, persona_id="ghost", goal="Sound calm.")
            await refused(mcp, "start_academy_session", "goal_required", 422, persona_id=p, goal="  ")
            await refused(mcp, "start_academy_session", "target_similarity_out_of_range", 422, persona_id=p,
                          goal="Sound calm.", target_similarity=1.5)
            await invalid(mcp, "start_academy_session", persona_id=p, goal="Sound calm.", budget_steps=0)
            await invalid(mcp, "start_academy_session", persona_id=p, goal="Sound calm.", budget_steps="lots")

            await refused(mcp, "get_academy_session", "academy_session_not_found", 404, session_id="ghost")
            await refused(mcp, "cancel_academy_session", "academy_session_not_found", 404, session_id="ghost")
            await invalid(mcp, "cancel_academy_session", session_id={"id": "ghost"})

            for uri in ("persona://ghost", "persona://ghost/genome", "layer://ghost", "academy://sessions/ghost"):
                with pytest.raises(MCPError):
                    await mcp.read_resource(uri)

    anyio.run(session)
    assert last_position(server) == before
