"""The academy over HTTP against the real server: a session trained to completion by the worker
`serve` runs by default on SQLite, on the tiny model, followed live over SSE; owner isolation; cancel; bad input."""

from __future__ import annotations

import json
import signal
from collections.abc import Callable
from pathlib import Path

import httpx
import numpy as np
import pytest
from servers import Server

from fixtures.make_model import tiny_spec
from inference.backends.base import ChatMessage
from inference.backends.torch import TorchBackend
from inference.lora.adapter import parse_adapter, to_canonical
from inference.lora.stack import assemble

MODEL = "tiny-llama"
# The academy worker setting left at its default: `serve` on SQLite runs sessions itself.
WORKER = {
    "academy_worker": None, "inference_model": MODEL, "inference_backend": "torch", "inference_device": "cpu",
    "academy_challenges": "3", "academy_keep_score": "0", "academy_learning_rate": "0.01",
    "academy_checkpoint_every": "5", "rate_limit_per_minute": "0",
}


def sse_events(client: httpx.Client, path: str) -> list[tuple[str, dict]]:
    """Every (event name, data) of an SSE stream, read until the server ends it."""
    found, name = [], None
    with client.stream("GET", path, headers={"Accept": "text/event-stream"}, timeout=300) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith("text/event-stream")
        for line in response.iter_lines():
            if line.startswith("event:"):
                name = line.split(":", 1)[1].strip()
            elif line.startswith("data:"):
                found.append((name, json.loads(line.split(":", 1)[1])))
    return found


def persona_on_tiny_model(client: httpx.Client) -> str:
    """A persona created with its genome on the tiny model, in one request."""
    created = client.post("/personas/", json={"name": "Calm Ada", "system_prompt": "You are calm.", "base_model": MODEL})
    assert created.status_code == 201, created.text
    persona = created.json()
    genome = client.get(f"/genomes/{persona['genome_id']}").json()
    assert (genome["persona_id"], genome["base_model"], genome["layers"]) == (persona["id"], MODEL, [])
    return persona["id"]


@pytest.fixture
def owners(start_server: Callable[..., Server], tiny_model: Path) -> tuple[Server, httpx.Client, httpx.Client]:
    server = start_server(**WORKER, inference_daemon="embedded")  # `serve`'s default: generation through the daemon
    assert server.cli("model", "register", MODEL, str(tiny_model)).returncode == 0
    alice, bob = (server.cli("keys", "create", "--owner", who).stdout.strip() for who in ("alice", "bob"))
    return server, server.client(alice), server.client(bob)


def test_serve_with_defaults_runs_a_session_to_completion_and_its_layer_changes_the_output(owners, tiny_model: Path) -> None:  # type: ignore[no-untyped-def]
    _, alice, bob = owners
    persona_id = persona_on_tiny_model(alice)
    assert bob.post("/academy/sessions/", json={"persona_id": persona_id, "goal": "x"}).status_code == 404

    created = alice.post("/academy/sessions/", json={"persona_id": persona_id, "goal": "Sound calm.", "budget_steps": 15})
    assert created.status_code == 201 and created.headers["ETag"] == '"1"'
    session = created.json()
    assert created.headers["Location"] == f"/academy/sessions/{session['id']}" and session["status"] == "pending"
    assert bob.get(f"/academy/sessions/{session['id']}").status_code == 404

    streamed = sse_events(alice, f"/academy/sessions/{session['id']}/events")

    names = [name for name, _ in streamed]
    assert names[0] == "AcademySessionStarted" and names[-1] == "SessionStatusChanged"
    assert streamed[-1][1]["data"]["status"] == "completed"
    progress = [data["data"] for name, data in streamed if name == "TrainingProgressed"]
    assert [p["step"] for p in progress] == [5, 10, 15] and progress[-1]["loss"] < progress[0]["loss"]
    assert names.count("ChallengeGenerated") == 3 and names.count("LayerProduced") == 1
    assert [e["type"] for e in alice.get(f"/academy/sessions/{session['id']}/events").json()] == names
    final = alice.get(f"/academy/sessions/{session['id']}").json()
    assert (final["status"], final["step"], final["example_count"]) == ("completed", 15, 3)
    [layer_id] = final["layer_ids"]
    layer = alice.get(f"/layers/{layer_id}").json()
    assert layer["training_metrics"]["steps"] == 15 and "academy" in layer["tags"]
    # The challenges were written by the inference daemon's worker (training loads a copy of its own).
    [worker] = [m for m in alice.get("/inference/stats").json()["models"] if m["model"] == MODEL]
    assert worker["state"] == "ready" and worker["engine"]["decode_steps"] > 0
    files = {name: alice.get(f"/layers/{layer_id}/adapter", params={"file": which}).content
             for name, which in (("adapter_model.safetensors", "weights"), ("adapter_config.json", "config"))}
    info = parse_adapter(files, tiny_spec(tiny_model), max_rank=64)
    backend = TorchBackend(tiny_model, device="cpu")
    ids = backend.encode_chat([ChatMessage("user", "How are you?")])
    stack = assemble([(layer_id, 1.0, to_canonical(files, info), info.scale)])
    assert not np.allclose(backend.logits(ids, None), backend.logits(ids, stack), atol=1e-3)

    version = final["version"]
    refused = alice.post(f"/academy/sessions/{session['id']}/cancel")
    assert refused.status_code == 409 and refused.json()["rule"] == "session_finished"
    assert alice.get(f"/academy/sessions/{session['id']}").json()["version"] == version


def test_cancel_stops_a_running_session_and_no_layer_is_registered(owners) -> None:  # type: ignore[no-untyped-def]
    _, alice, _ = owners
    persona_id = persona_on_tiny_model(alice)
    session = alice.post("/academy/sessions/", json={"persona_id": persona_id, "goal": "Sound calm.",
                                                      "budget_steps": 100_000}).json()
    path = f"/academy/sessions/{session['id']}"
    with alice.stream("GET", f"{path}/events", headers={"Accept": "text/event-stream"}, timeout=300) as stream:
        for line in stream.iter_lines():  # live: wait for the first checkpointed training step
            if line == "event: TrainingProgressed":
                break
        cancelled = alice.post(f"{path}/cancel")
        assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"
    again = alice.post(f"{path}/cancel")
    assert again.status_code == 409 and again.json()["rule"] == "session_finished"
    assert alice.get(path).json()["layer_ids"] == []
    assert alice.get("/layers/").json()["items"] == []


def test_a_server_stopped_mid_session_leaves_it_to_the_next_start_which_resumes_it(
    start_server: Callable[..., Server], tiny_model: Path
) -> None:
    first = start_server(**WORKER)
    assert first.cli("model", "register", MODEL, str(tiny_model)).returncode == 0
    client = first.client()
    session = client.post("/academy/sessions/", json={"persona_id": persona_on_tiny_model(client),
                                                      "goal": "Sound calm.", "budget_steps": 100_000}).json()
    path = f"/academy/sessions/{session['id']}"
    with client.stream("GET", f"{path}/events", headers={"Accept": "text/event-stream"}, timeout=300) as stream:
        for line in stream.iter_lines():
            if line == "event: TrainingProgressed":
                break
    assert first.process is not None
    first.process.terminate()  # a graceful shutdown: the worker stops before the engine closes
    # uvicorn shuts down, then raises the signal again for its default action.
    assert first.process.wait(timeout=60) in (0, -signal.SIGTERM)

    second = start_server(**WORKER)
    client = second.client()
    assert client.get(path).json()["status"] == "running"
    step = client.get(path).json()["step"]
    with client.stream("GET", f"{path}/events", headers={"Accept": "text/event-stream"}, timeout=300) as stream:
        for line in stream.iter_lines():  # history first, then the resumed run's steps
            if line.startswith("data:") and '"TrainingProgressed"' in line and json.loads(line[5:])["data"]["step"] > step:
                break
    assert client.post(f"{path}/cancel").json()["status"] == "cancelled"
    history = client.get(f"{path}/events").json()
    assert [e["data"]["status"] for e in history if e["type"] == "SessionStatusChanged"] == ["running", "cancelled"]
    steps = [e["data"]["step"] for e in history if e["type"] == "TrainingProgressed"]
    assert steps == sorted(set(steps))


@pytest.mark.parametrize(
    ("body", "status", "rule"),
    [
        ({"persona_id": "nobody", "goal": "x"}, 404, "persona_not_found"),
        ({"goal": "   "}, 422, "goal_required"),
        ({"goal": "x", "target_similarity": 1.5}, 422, "target_similarity_out_of_range"),
        ({"goal": "x", "budget_steps": 0}, 400, "bad_request"),
        ({"goal": "x", "budget_steps": 100_001}, 400, "bad_request"),
        ({"goal": "x", "budget_seconds": 0}, 400, "bad_request"),
        ({"goal": "x", "budget": 5}, 400, "bad_request"),
        # Refused up front, not accepted and then failed by a worker: the layer would have nowhere to go.
        ({"goal": "Sound calm."}, 422, "persona_has_no_genome"),
    ],
)
def test_bad_session_input_is_refused_precisely_and_appends_nothing(
    server: Server, body: dict, status: int, rule: str
) -> None:
    client = server.client()
    persona = client.post("/personas/", json={"name": "Ada"}).json()
    response = client.post("/academy/sessions/", json={"persona_id": persona["id"], **body})
    assert response.status_code == status and response.json()["rule"] == rule
    assert response.headers["content-type"].startswith("application/problem+json")
    assert client.get("/academy/sessions/").json()["items"] == []
    assert client.post("/academy/sessions/unknown/cancel").status_code == 404


def test_challenges_on_demand_are_written_by_the_model_and_answers_judged_into_0_to_100(
    start_server: Callable[..., Server], tiny_model: Path
) -> None:
    server = start_server(**{**WORKER, "academy_worker": "off"})
    assert server.cli("model", "register", MODEL, str(tiny_model)).returncode == 0
    client = server.client()
    persona_id = persona_on_tiny_model(client)
    session = client.post("/academy/sessions/", json={"persona_id": persona_id, "goal": "Sound calm."}).json()
    path = f"/academy/sessions/{session['id']}/challenges"

    made = client.post(path, json={"trait_type": "tone_and_voice", "difficulty": "advanced"})
    assert made.status_code == 201, made.text
    challenge = made.json()
    assert challenge["prompt"].strip() and (challenge["trait_type"], challenge["difficulty"]) == ("tone_and_voice", "advanced")
    scored = client.post(f"{path}/{challenge['id']}/responses", json={"response": "Breathe. All is well."})

    # The random tiny model never writes a valid verdict: retried, then the heuristic scores it.
    assert scored.status_code == 201, scored.text
    score = scored.json()
    assert score["judge"] == "heuristic" and 0 <= score["score"] <= 100 and score["rationale"]
    types = [e["type"] for e in client.get(f"/academy/sessions/{session['id']}/events").json()]
    assert types == ["AcademySessionStarted", "ChallengeGenerated", "ResponseScored", "ExampleKept"]

    again = client.post(f"{path}/{challenge['id']}/responses", json={"response": "Again."})
    assert again.status_code == 409 and again.json()["rule"] == "response_exists"
    fresh = client.post(path, json={"trait_type": "tone_and_voice"}).json()
    blank = client.post(f"{path}/{fresh['id']}/responses", json={"response": "  "})
    assert blank.status_code == 422 and blank.json()["rule"] == "response_required"
    assert client.post(f"{path}/nope/responses", json={"response": "x"}).json()["rule"] == "challenge_not_found"
    assert client.post(path, json={"trait_type": "humour"}).status_code == 400
    before = len(client.get(f"/academy/sessions/{session['id']}/events").json())
    assert client.post(f"/academy/sessions/{session['id']}/cancel").status_code == 200
    twice = client.post(f"/academy/sessions/{session['id']}/cancel")
    assert twice.status_code == 409 and twice.json()["rule"] == "session_finished"
    finished = client.post(path, json={"trait_type": "tone_and_voice"})
    assert finished.status_code == 409 and finished.json()["rule"] == "session_finished"
    assert len(client.get(f"/academy/sessions/{session['id']}/events").json()) == before + 1  # the cancel only
