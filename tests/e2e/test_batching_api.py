"""Many personas at once on the real server and the default model: their chats share decode steps."""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from servers import Server
from test_chat_api import default_model_server

from fixtures.make_adapter import make_adapter_files

PERSONAS = 8


def persona_with_layer(client: httpx.Client, index: int) -> str:
    """A persona on the default model whose genome holds its own rank-4 layer (none for the first)."""
    persona = client.post("/personas", json={
        "name": f"P{index}", "system_prompt": f"You are persona number {index}.", "base_model": "smollm2-135m-instruct",
    })  # fmt: skip
    assert persona.status_code == 201, persona.text
    body = persona.json()
    if index:
        files = make_adapter_files("peft", rank=4, seed=index)
        metadata = {"name": f"layer {index}", "base_model": "smollm2-135m-instruct", "trait_type": "domain_expertise"}
        layer = client.post("/layers", files=[("files", (n, d)) for n, d in files.items()], data={"metadata": json.dumps(metadata)})
        assert layer.status_code == 201, layer.text
        attached = client.post(f"/genomes/{body['genome_id']}/layers", json={"layer_id": layer.json()["id"], "weight": 1.0})
        assert attached.status_code == 200, attached.text
    return body["id"]


def test_eight_personas_chatting_at_once_all_answer_in_shared_batches(
    start_server: Callable[..., Server], default_model: Path
) -> None:
    server = default_model_server(start_server, default_model)
    with server.client() as client:
        personas = [persona_with_layer(client, i) for i in range(PERSONAS)]
        assert client.get("/inference/stats").json()["loaded"] is False

    def chat(persona_id: str) -> httpx.Response:
        with httpx.Client(base_url=server.url, timeout=300) as own:
            return own.post(f"/personas/{persona_id}/chat", json={
                "messages": [{"role": "user", "content": "Say something about the sea."}], "max_tokens": 24,
            })  # fmt: skip

    with ThreadPoolExecutor(PERSONAS) as pool:
        answers = list(pool.map(chat, personas))
    for answer in answers:
        assert answer.status_code == 200, answer.text
        assert answer.json()["message"]["content"] and answer.json()["generation"]["usage"]["completion_tokens"] > 0

    with server.client() as client:
        stats = client.get("/inference/stats").json()
    engine = stats["engine"]
    assert stats["loaded"] and engine["mode"] == "batching" and engine["max_step_batch_size"] > 1
    assert engine["active_requests"] == 0 and engine["union_rank"] == 0  # everyone has left
    assert sorted(p["persona_id"] for p in stats["personas"]) == sorted(personas)
    assert all(p["requests"] == 1 and p["errors"] == 0 for p in stats["personas"])
