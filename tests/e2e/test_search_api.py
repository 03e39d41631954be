"""Layer search and persona knowledge over HTTP, on the real server with the real model."""

from __future__ import annotations

import json
import math

import httpx
import pytest
from servers import Server
from test_layers_api import upload
from test_personas_and_genomes_api import PROBLEM, create_persona

from fixtures.make_adapter import make_adapter_files

DIM = 384  # all-MiniLM-L6-v2; the service reads it from the model


def layer(client: httpx.Client, seed: int, **details: object) -> str:
    created = upload(client, make_adapter_files("peft", seed=seed), **details)
    assert created.status_code == 201, created.text
    return created.json()["id"]


def found(client: httpx.Client, q: str, **params: object) -> list[str]:
    response = client.get("/layers/search", params={"q": q, "k": 20, **params})
    assert response.status_code == 200, response.text
    return [item["layer"]["id"] for item in response.json()["items"]]


def refused(response: httpx.Response, rule: str) -> None:
    assert response.status_code == 422, response.text
    assert response.headers["content-type"] == PROBLEM and response.json()["rule"] == rule, response.text


@pytest.fixture
def owners(start_server):  # type: ignore[no-untyped-def]
    server: Server = start_server()
    alice, bob = (server.cli("keys", "create", "--owner", who).stdout.strip() for who in ("alice", "bob"))
    with server.client(alice) as a, server.client(bob) as b:
        yield a, b, server


def test_layer_search_respects_visibility_filters_and_removal(owners) -> None:  # type: ignore[no-untyped-def]
    alice, bob, _ = owners
    math_tutor = layer(alice, 0, name="algebra tutor", description="patient help with equations", tags=["math"])
    poet = layer(alice, 1, name="romantic poet", description="writes sonnets", trait_type="tone_and_voice", tags=["poetry"], public=True)
    secret = layer(bob, 2, name="algebra secrets", description="bob's private equations", tags=["math"])
    shared = layer(bob, 3, name="geometry tutor", description="proofs and triangles", tags=["geometry"], public=True)

    assert found(alice, "help me solve an equation")[0] == math_tutor
    assert set(found(alice, "algebra equations")) == {math_tutor, poet, shared}  # never bob's private one
    assert set(found(bob, "algebra equations")) == {secret, poet, shared}
    assert found(alice, "poetry", trait_type="tone_and_voice") == [poet]
    scores = [m["score"] for m in alice.get("/layers/search", params={"q": "triangles"}).json()["items"]]
    assert scores == sorted(scores, reverse=True) and all(-1 <= s <= 1 for s in scores)

    like = alice.post("/layers/search", json={"like_layer_id": shared, "k": 5, "tags": ["math"]})
    assert [m["layer"]["id"] for m in like.json()["items"]] == [math_tutor]
    assert alice.post("/layers/search", json={"like_layer_id": secret}).status_code == 404

    assert bob.patch(f"/layers/{shared}", json={"public": False}).status_code == 200
    assert shared not in found(alice, "geometry proofs")  # read-your-writes, across owners
    assert alice.delete(f"/layers/{math_tutor}").status_code == 204
    assert math_tutor not in found(alice, "help me solve an equation")


def test_a_user_supplied_vector_is_checked_normalised_and_searched(owners) -> None:  # type: ignore[no-untyped-def]
    alice, _, _ = owners
    direction = [0.0] * DIM
    direction[7] = 3.0
    mine = layer(alice, 4, embedding=direction)
    hit = alice.post("/layers/search", json={"vector": direction, "k": 1}).json()["items"][0]
    assert hit["layer"]["id"] == mine and math.isclose(hit["score"], 1.0, abs_tol=1e-5)
    refused(upload(alice, make_adapter_files("peft", seed=5), embedding=[1.0] * (DIM - 1)), "vector_dimension_mismatch")


BAD_SEARCHES = [
    ("GET", {"q": "x", "k": 0}, "k_out_of_range"),
    ("GET", {"q": "x", "k": 101}, "k_out_of_range"),
    ("GET", {"q": "  "}, "query_text_required"),
    ("POST", {"vector": [0.5] * (DIM + 1)}, "vector_dimension_mismatch"),
    ("POST", {"vector": [float("nan")] + [0.5] * (DIM - 1)}, "vector_not_finite"),
    ("POST", {"vector": [0.0] * DIM}, "vector_zero"),
    ("POST", {"text": "x", "vector": [0.5] * DIM}, "one_query_required"),
    ("POST", {"text": ""}, "query_text_required"),
    ("POST", {"text": "x", "k": -1}, "k_out_of_range"),
]


def test_bad_search_input_is_422_with_the_reason_and_changes_nothing(server: Server, subtests: pytest.Subtests) -> None:
    with server.client() as client:
        before = client.get("/layers").json()
        for method, values, rule in BAD_SEARCHES:
            with subtests.test(msg=f"{method} {rule}"):
                if method == "GET":
                    response = client.get("/layers/search", params=values)
                else:  # Python's json writes NaN as the bare token, as many clients do
                    response = client.post("/layers/search", content=json.dumps(values), headers={"content-type": "application/json"})
                refused(response, rule)
        assert client.get("/layers").json() == before


def test_persona_knowledge_add_search_list_remove(owners) -> None:  # type: ignore[no-untyped-def]
    alice, bob, server = owners
    persona = create_persona(alice)["id"]
    base = f"/personas/{persona}/knowledge"
    text = "The lighthouse keeper logs every ship that passes the northern reef. " * 30
    note = alice.post(base, json={"text": text, "title": "logbook"})
    assert note.status_code == 201, note.text
    assert note.json()["chunk_count"] > 1
    files = [("files", ("garden.md", b"# Garden\n\nTomatoes need sun and water every morning.")),
             ("files", ("bees.txt", b"Bees pollinate the tomato flowers."))]
    uploaded = alice.post(f"{base}/documents", files=files)
    assert uploaded.status_code == 201, uploaded.text
    assert [d["media_type"] for d in uploaded.json()] == ["text/markdown", "text/plain"]
    assert {d["title"] for d in alice.get(base).json()["items"]} == {"logbook", "garden.md", "bees.txt"}

    passages = alice.get(f"{base}/search", params={"q": "what do tomatoes need", "k": 2}).json()
    assert passages[0]["knowledge_id"] == uploaded.json()[0]["id"] and "sun" in passages[0]["text"]
    budget = alice.get(f"{base}/search", params={"q": "ships near the reef", "k": 5, "max_tokens": 200, "mmr": 0.5}).json()
    assert budget and sum(p["tokens"] for p in budget) <= 200

    assert bob.get(f"{base}/search", params={"q": "ships"}).status_code == 404  # another owner's persona
    refused(alice.get(f"{base}/search", params={"q": "ships", "k": 0}), "k_out_of_range")
    assert alice.delete(f"{base}/{note.json()['id']}").status_code == 204
    after = alice.get(f"{base}/search", params={"q": "ships near the reef", "k": 10}).json()
    assert note.json()["id"] not in {p["knowledge_id"] for p in after}
    assert alice.delete(f"{base}/{note.json()['id']}").status_code == 404

    rebuilt = server.cli("--quiet", "index", "rebuild")
    assert rebuilt.returncode == 0 and "indexing" not in rebuilt.stderr, rebuilt.stderr  # --quiet: no progress bar
    status = server.cli("index", "status")
    last = max(event["position"] for event in map(json.loads, server.cli("events", "tail", "--limit", "1").stdout.splitlines()))
    assert status.returncode == 0 and status.stdout.count(f"saved at: {last}") == 2, status.stdout
