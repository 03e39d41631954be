"""Recipes over HTTP against the real server: the built-in `genome-assembly` run end to end on the
tiny model by the server's own worker (SQLite), followed over SSE; each definition rule refusing a
bad recipe with 422 and storing nothing; revisions pinned by runs; `genome-service recipe run`."""

from __future__ import annotations

import json
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import CLI, Server
from test_academy_api import MODEL, WORKER, persona_on_tiny_model, sse_events

from fixtures.make_adapter import make_adapter_files
from fixtures.make_model import tiny_spec
from rag.embedder import SentenceTransformerEmbedder

CALM = "Answer in a calm and gentle voice."
CHESS = "Explain the rules of chess."


def test_genome_assembly_attaches_the_layer_a_need_already_has_and_trains_one_for_the_other_only(
    start_server: Callable[..., Server], tiny_model: Path, embedder: SentenceTransformerEmbedder
) -> None:
    server = start_server(**WORKER)
    assert server.cli("model", "register", MODEL, str(tiny_model)).returncode == 0
    client = server.client()
    persona_id = persona_on_tiny_model(client)
    # A layer whose own vector is the first need's: it meets that need exactly, and not the other.
    metadata = {"name": "calm voice", "base_model": MODEL, "trait_type": "tone_and_voice",
                "embedding": embedder.embed([CALM])[0].tolist()}
    files = make_adapter_files("peft", spec=tiny_spec(tiny_model, MODEL))
    layer = client.post("/layers", files=[("files", (n, d)) for n, d in files.items()], data={"metadata": json.dumps(metadata)})
    assert layer.status_code == 201, layer.text
    layer_id = layer.json()["id"]

    started = client.post("/recipes/genome-assembly/runs", json={"inputs": {
        "persona_id": persona_id, "goal": f"{CALM} {CHESS}", "target_similarity": 0.9, "budget_steps": 5}})
    assert started.status_code == 201, started.text
    run = started.json()
    assert started.headers["Location"] == f"/recipes/genome-assembly/runs/{run['id']}"
    assert (run["status"], run["recipe_revision"], [s["status"] for s in run["steps"]]) == ("pending", 1, ["waiting"] * 4)

    streamed = sse_events(client, f"/recipes/genome-assembly/runs/{run['id']}/events")

    steps = [(name, data["data"].get("step_id")) for name, data in streamed if name.startswith("Step")]
    assert steps == [("StepStarted", "analyse"), ("StepCompleted", "analyse"), ("StepStarted", "attach"),
                     ("StepCompleted", "attach"), ("StepStarted", "train"), ("StepAwaiting", "train"),
                     ("StepCompleted", "train"), ("StepStarted", "stack"), ("StepCompleted", "stack")]
    assert [name for name, _ in streamed][:2] == ["RunStarted", "RunPickedUp"] and streamed[-1][0] == "RunCompleted"
    outputs = {data["data"]["step_id"]: data["data"]["output"] for name, data in streamed if name == "StepCompleted"}
    analysis = outputs["analyse"]
    assert [n["need"] for n in analysis["needs"]] == [CALM, CHESS]
    assert analysis["needs"][0]["layers"][0] == {"layer_id": layer_id, "similarity": pytest.approx(1.0, abs=1e-4)}
    assert (analysis["close_layer_ids"], analysis["open_needs"]) == ([layer_id], [CHESS])
    assert outputs["attach"]["attached"] == [layer_id]
    [trained] = outputs["train"]["layer_ids"]
    assert outputs["train"]["status"] == "completed" and trained != layer_id
    final = {"genome_id": outputs["stack"]["genome_id"], "persona_id": persona_id, "base_model": MODEL,
             "layers": [{"layer_id": layer_id, "weight": 1.0}, {"layer_id": trained, "weight": 1.0}]}
    assert streamed[-1][1]["data"]["output"] == final

    # The session's plan: one training task, for the second need only.
    session_id = outputs["train"]["session_id"]
    plan = [e["data"]["tasks"] for e in client.get(f"/academy/sessions/{session_id}/events").json() if e["type"] == "PlanMade"]
    assert [[(t["need"], t["action"]) for t in tasks] for tasks in plan] == [[(CHESS, "train")]]
    assert [ref["layer_id"] for ref in client.get(f"/genomes/{final['genome_id']}").json()["layers"]] == [layer_id, trained]
    done = client.get(f"/recipes/genome-assembly/runs/{run['id']}").json()
    assert done["status"] == "completed" and done["output"] == final
    assert [e["type"] for e in client.get(f"/recipes/genome-assembly/runs/{run['id']}/events").json()] == [n for n, _ in streamed]
    refused = client.post(f"/recipes/genome-assembly/runs/{run['id']}/cancel")
    assert refused.status_code == 409 and refused.json()["rule"] == "run_finished"


STACK = {"id": "stack", "command": "genome.stack", "params": {"persona_id": "{{ inputs.persona_id }}"}}
INPUTS = {"persona_id": {"type": "string"}}


def recipe(*steps: dict, **fields: object) -> dict:
    return {"name": "mine", "inputs": INPUTS, "steps": list(steps), **fields}


BAD = [
    (recipe({**STACK, "command": "genome.explode"}), "command_unknown", "stack"),
    (recipe({**STACK, "params": {"persona_id": 7}}), "param_invalid", "stack"),
    (recipe({**STACK, "params": {"persona_id": "{{ inputs.persona_id }}", "colour": "red"}}), "param_unknown", "stack"),
    (recipe({"id": "chat", "command": "persona.chat", "params": {"persona_id": "{{ inputs.persona_id }}"}}),
     "param_missing", "chat"),
    (recipe({**STACK, "async": True}), "step_not_async", "stack"),
    (recipe({**STACK, "params": {"persona_id": "{{ inputs.nobody }}"}}), "reference_unknown_input", "stack"),
    (recipe({**STACK, "params": {"genome_id": "{{ steps.stack.output.genome_id }}"}}), "reference_to_itself", "stack"),
    (recipe({**STACK, "params": {"genome_id": "{{ steps.later.output.genome_id }}"}}, {**STACK, "id": "later"}),
     "reference_to_later_step", "stack"),
    (recipe({**STACK, "params": {"genome_id": "{{ steps.gone.output.genome_id }}"}}), "reference_to_missing_step", "stack"),
    (recipe(STACK, STACK), "step_id_repeated", "stack"),
    (recipe({**STACK, "when": "inputs.persona_id =="}), "expression_invalid", "stack"),
    (recipe({**STACK, "params": {"persona_id": "{{ inputs.persona_id | [ }}"}}), "expression_invalid", "stack"),
]


def test_each_definition_rule_refuses_a_bad_recipe_with_422_naming_the_step_and_stores_nothing(
    server: Server, tmp_path: Path
) -> None:
    client = server.client()
    for body, rule, step in BAD:
        response = client.post("/recipes/", json=body)
        assert response.status_code == 422, (rule, response.text)
        problem = response.json()
        assert response.headers["content-type"].startswith("application/problem+json")
        assert (problem["rule"], f"step {step!r}" in problem["detail"]) == (rule, True), problem
    assert [r["name"] for r in client.get("/recipes/").json()["items"]] == ["genome-assembly"]
    with sqlite3.connect(tmp_path / "data" / "genome.db") as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)


def test_a_run_pins_the_revision_it_started_with_and_inputs_are_checked_against_their_types(server: Server) -> None:
    client = server.client()
    created = client.post("/recipes/", json=recipe(STACK))
    assert created.status_code == 201, created.text
    mine = created.json()
    assert client.post("/recipes/", json=recipe(STACK)).json()["rule"] == "recipe_name_exists"
    catalogue = {c["name"]: c for c in client.get("/recipes/commands").json()}
    assert catalogue["academy.train"]["async"] and catalogue["genome.stack"]["input_schema"]["$defs"]
    run = client.post(f"/recipes/{mine['id']}/runs", json={"inputs": {"persona_id": "p1"}}).json()
    revised = client.put(f"/recipes/{mine['id']}", json={"inputs": {**INPUTS, "n": {"type": "integer", "default": 1}},
                                                         "steps": [STACK, {**STACK, "id": "again"}]})
    assert revised.status_code == 200 and revised.json()["revision"] == 2
    pinned = client.get(f"/recipes/mine/runs/{run['id']}").json()
    assert (pinned["recipe_revision"], [s["id"] for s in pinned["steps"]]) == (1, ["stack"])
    for inputs, rule in (({}, "input_missing"), ({"persona_id": 1}, "input_type_mismatch"),
                         ({"persona_id": "p", "n": 1.5}, "input_type_mismatch"), ({"persona_id": "p", "x": 1}, "input_unknown")):
        answer = client.post("/recipes/mine/runs", json={"inputs": inputs})
        assert (answer.status_code, answer.json()["rule"]) == (422, rule)
    assert [r["id"] for r in client.get("/recipes/mine/runs").json()["items"]] == [run["id"]]
    assert client.delete(f"/recipes/{mine['id']}").json()["retired"] is True
    assert client.get(f"/recipes/{mine['id']}").status_code == 410
    assert [r["id"] for r in client.get(f"/recipes/{mine['id']}/runs").json()["items"]] == [run["id"]]
    assert client.post(f"/recipes/{mine['id']}/runs", json={"inputs": {"persona_id": "p"}}).json()["rule"] == "recipe_archived"
    cancelled = client.post(f"/recipes/{mine['id']}/runs/{run['id']}/cancel")
    assert cancelled.status_code == 200 and cancelled.json()["status"] == "cancelled"


def test_recipe_run_on_the_command_line_shows_its_steps_and_prints_the_output(server: Server) -> None:
    client = server.client()
    persona = client.post("/personas/", json={"name": "Ada", "base_model": "smollm2-135m-instruct"}).json()
    assert client.post("/recipes/", json=recipe(STACK)).status_code == 201
    done = subprocess.run([*CLI, "recipe", "run", "mine", "--input", f"persona_id={persona['id']}"], env=server.env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    *_, first, output = done.stdout.strip().splitlines()
    assert first.endswith(" completed") and json.loads(output)["genome_id"] == persona["genome_id"]
    assert "step 1/1 stack (genome.stack): completed" in done.stderr
    bad = subprocess.run([*CLI, "recipe", "run", "mine", "--input", "persona_id"], env=server.env, capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 1 and "expected NAME=VALUE" in bad.stderr
    unknown = subprocess.run([*CLI, "recipe", "run", "nope"], env=server.env, capture_output=True, text=True, timeout=120)
    assert unknown.returncode == 1 and "no recipe 'nope'" in unknown.stderr
