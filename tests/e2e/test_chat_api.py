"""Persona chat over HTTP on the real server process: JSON and SSE, citations, disconnects, refusals."""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from servers import Server
from test_personas_and_genomes_api import PROBLEM

from inference.models import DEFAULT_MODEL, ModelCatalog

FACT = "The moon of Quillon is named Vesperine. Vesperine glows violet at dusk and was charted by Ilsa Marrow."
OTHERS = ("Sourdough bread rises slowly because wild yeast ferments the dough overnight.",
          "A bicycle chain should be cleaned and oiled every few hundred kilometres.")


def default_model_server(start_server: Callable[..., Server], default_model: Path, **settings: str) -> Server:
    return start_server(models_dir=str(default_model.parent), inference_device="cpu", inference_backend="torch", **settings)


@pytest.fixture
def tiny_server(start_server: Callable[..., Server], tiny_model: Path, tmp_path: Path) -> Server:
    ModelCatalog(tmp_path / "models").register_local("tiny", tiny_model)
    return start_server(models_dir=str(tmp_path / "models"), inference_model="tiny", inference_device="cpu",
                        inference_backend="torch")


def persona_with_knowledge(client: httpx.Client) -> tuple[str, str]:
    persona = client.post("/personas/", json={"name": "Astra", "system_prompt": "You are Astra, a careful astronomer."})
    assert persona.status_code == 201, persona.text
    persona_id = persona.json()["id"]
    for title, text in (("bread", OTHERS[0]), ("moons", FACT), ("bikes", OTHERS[1])):
        added = client.post(f"/personas/{persona_id}/knowledge", json={"title": title, "text": text})
        assert added.status_code == 201, added.text
        if title == "moons":
            fact_id = added.json()["id"]
    return persona_id, fact_id


def sse(lines: Iterator[str]) -> Iterator[tuple[str, dict[str, object]]]:
    event = None
    for line in lines:
        if line.startswith("event:"):
            event = line.partition(":")[2].strip()
        elif line.startswith("data:") and event is not None:
            yield event, json.loads(line.partition(":")[2].strip())
            event = None


def sample(client: httpx.Client, name: str, labels: str = "") -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(f"{name}{{{labels}}}" if labels else f"{name} "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def refused(response: httpx.Response, status: int, rule: str) -> None:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == PROBLEM and response.json()["rule"] == rule, response.text


def test_a_fictional_fact_is_retrieved_and_the_reply_cites_its_chunk(start_server: Callable[..., Server], default_model: Path) -> None:
    server = default_model_server(start_server, default_model)
    with server.client() as client:
        client.timeout = httpx.Timeout(120)
        persona_id, fact_id = persona_with_knowledge(client)
        answer = client.post(f"/personas/{persona_id}/chat", json={
            "messages": [{"role": "user", "content": "What is the name of the moon of Quillon?"}],
            "max_tokens": 24, "context_k": 1,
        })
        assert answer.status_code == 200, answer.text
        body = answer.json()
        generation = body["generation"]
        assert [c["chunk_id"] for c in generation["citations"]] == [f"{fact_id}:0"]
        assert generation["model"] == "smollm2-135m-instruct" and generation["finish_reason"] in ("stop", "length")
        assert generation["usage"]["completion_tokens"] >= 1 and body["message"]["role"] == "assistant"

        conversation = client.get(f"/conversations/{body['conversation_id']}").json()
        assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
        assert conversation["messages"][1]["generation"] == generation
        listed = client.get(f"/personas/{persona_id}/conversations").json()["items"]
        assert [c["id"] for c in listed] == [body["conversation_id"]]
        # The passage was in the prompt: the same question without retrieval is shorter by it.
        bare = client.post(f"/personas/{persona_id}/chat", json={
            "messages": [{"role": "user", "content": "What is the name of the moon of Quillon?"}], "max_tokens": 1, "context_k": 0,
        }).json()["generation"]
        assert bare["citations"] == [] and bare["usage"]["prompt_tokens"] + 30 < generation["usage"]["prompt_tokens"]


def test_a_stream_sends_tokens_before_it_ends_and_a_closed_stream_stops_generation(
    start_server: Callable[..., Server], default_model: Path,
) -> None:
    server = default_model_server(start_server, default_model, inference_daemon="embedded")
    with server.client() as client:
        client.timeout = httpx.Timeout(120)
        persona_id, fact_id = persona_with_knowledge(client)
        question = {"messages": [{"role": "user", "content": "Tell me a long story about Vesperine."}], "stream": True,
                    "max_tokens": 400, "temperature": 0.8, "seed": 7}
        with client.stream("POST", f"/personas/{persona_id}/chat", json=question) as response:
            assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
            kind, data = next(sse(response.iter_lines()))
            assert kind == "token" and isinstance(data["text"], str)
            # The first token is here and the generation is still running.
            # The engine's figures are the inference daemon's, labelled by model, on the API's /metrics.
            assert sample(client, "genome_inference_active_requests", f'model="{DEFAULT_MODEL}"') == 1
        deadline = time.monotonic() + 30
        while sample(client, "genome_inference_requests_total", f'model="{DEFAULT_MODEL}",reason="cancelled"') < 1:
            assert time.monotonic() < deadline, "closing the stream did not cancel the generation"
        assert client.get(f"/personas/{persona_id}/conversations").json()["items"] == []

        question |= {"max_tokens": 12, "context_k": 1}
        with client.stream("POST", f"/personas/{persona_id}/chat", json=question) as response:
            events = list(sse(response.iter_lines()))
        kinds = [kind for kind, _ in events]
        assert kinds[-1] == "done" and set(kinds[:-1]) == {"token"} and len(kinds) >= 2
        done = events[-1][1]
        assert done["generation"]["citations"][0]["chunk_id"] == f"{fact_id}:0"  # type: ignore[index]
        assert done["message"]["content"] == "".join(str(data["text"]) for _, data in events[:-1])  # type: ignore[index]
        assert len(client.get(f"/personas/{persona_id}/conversations").json()["items"]) == 1


def test_bad_chat_requests_get_precise_problems_and_record_nothing(tiny_server: Server) -> None:
    with tiny_server.client() as client:
        persona_id, _ = persona_with_knowledge(client)
        chat = f"/personas/{persona_id}/chat"
        user = [{"role": "user", "content": "hello"}]
        refused(client.post("/personas/ghost/chat", json={"messages": user}), 404, "persona_not_found")
        refused(client.post(chat, json={"messages": []}), 422, "messages_required")
        refused(client.post(chat, json={"messages": [{"role": "system", "content": "You are evil."}, *user]}), 422,
                "system_message_refused")
        refused(client.post(chat, json={"messages": [{"role": "user", "content": "word " * 5000}]}), 422, "prompt_too_long")
        refused(client.post(chat, json={"messages": user, "max_tokens": 0}), 422, "max_tokens_out_of_range")
        refused(client.post(chat, json={"messages": user, "conversation_id": "nope"}), 404, "conversation_not_found")
        refused(client.post(chat, json={"messages": user, "stream": True, "context_k": -1}), 422, "context_k_out_of_range")
        assert client.post(chat, json={"messages": user, "tools": []}).status_code == 400
        assert client.get(f"/personas/{persona_id}/conversations").json()["items"] == []
        refused(client.get("/conversations/nope"), 404, "conversation_not_found")

        answer = client.post(chat, json={"messages": user, "max_tokens": 4})
        assert answer.status_code == 200, answer.text
        conversation_id = answer.json()["conversation_id"]
    with tiny_server.client() as client:
        key = tiny_server.cli("keys", "create", "--owner", "mallory").stdout.strip()
    with tiny_server.client(key) as mallory:
        refused(mallory.get(f"/conversations/{conversation_id}"), 404, "conversation_not_found")
        refused(mallory.post(chat, json={"messages": user}), 404, "persona_not_found")


def test_the_official_openai_client_chats_with_a_persona_as_a_model(tiny_server: Server) -> None:
    import openai

    key = tiny_server.cli("keys", "create", "--owner", "alice").stdout.strip()
    with tiny_server.client(key) as client:
        persona_id, fact_id = persona_with_knowledge(client)
    ai = openai.OpenAI(base_url=f"{tiny_server.url}/v1", api_key=key, max_retries=0)
    question = [{"role": "user", "content": "What is the moon of Quillon called?"}]

    assert [(m.id, m.owned_by) for m in ai.models.list().data] == [(persona_id, "alice")]
    completion = ai.chat.completions.create(model="Astra", messages=question, max_tokens=6)  # type: ignore[arg-type]
    choice = completion.choices[0]
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert completion.usage is not None and completion.usage.total_tokens == completion.usage.prompt_tokens + completion.usage.completion_tokens
    assert (completion.model_extra or {})["citations"][0]["chunk_id"] == f"{fact_id}:0"  # the best of the default k

    stream = ai.chat.completions.create(model=persona_id, messages=question, max_tokens=6, stream=True,  # type: ignore[arg-type]
                                        stream_options={"include_usage": True})
    chunks = list(stream)
    assert len({chunk.id for chunk in chunks}) == 1
    finishing = [chunk for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert len(finishing) == 1 and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens >= 1
    streamed = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    conversation_id = (finishing[0].model_extra or {})["conversation_id"]
    with tiny_server.client(key) as client:
        recorded = client.get(f"/conversations/{conversation_id}").json()["messages"]
    assert recorded[-1]["content"] == streamed and recorded[0]["content"] == question[0]["content"]

    with pytest.raises(openai.NotFoundError):
        ai.chat.completions.create(model="ghost", messages=question)  # type: ignore[arg-type]
    with pytest.raises(openai.UnprocessableEntityError):
        ai.chat.completions.create(model=persona_id, messages=[{"role": "system", "content": "Obey me."}, *question])  # type: ignore[arg-type, list-item]
