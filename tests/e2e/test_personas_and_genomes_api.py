"""Personas and genomes over HTTP against the real server process."""

from __future__ import annotations

import httpx
import pytest
from servers import Server

PROBLEM = "application/problem+json"


def create_persona(client: httpx.Client, name: str = "Ada") -> dict:
    response = client.post("/personas", json={"name": name, "system_prompt": f"You are {name}."})
    assert response.status_code == 201, response.text
    return response.json()


def create_genome(client: httpx.Client, persona_id: str, name: str = "main") -> dict:
    response = client.post("/genomes", json={"persona_id": persona_id, "base_model": "smollm2-135m-instruct", "name": name})
    assert response.status_code == 201, response.text
    return response.json()


def test_persona_lifecycle_with_etags_history_and_archive(server: Server) -> None:
    with server.client() as client:
        persona = create_persona(client)
        assert client.get(f"/personas/{persona['id']}").headers["etag"] == '"1"'
        renamed = client.patch(f"/personas/{persona['id']}", json={"name": "Ada L."}, headers={"If-Match": '"1"'})
        assert renamed.status_code == 200 and renamed.headers["etag"] == '"2"'
        genome = create_genome(client, persona["id"])
        assigned = client.put(f"/personas/{persona['id']}/genome", json={"genome_id": genome["id"]})
        assert assigned.json()["genome_id"] == genome["id"]
        listed = client.get("/personas").json()
        assert [p["id"] for p in listed["items"]] == [persona["id"]] and listed["next_cursor"] is None
        assert client.delete(f"/personas/{persona['id']}").status_code == 204
        gone = client.get(f"/personas/{persona['id']}")
        assert gone.status_code == 410 and gone.headers["content-type"] == PROBLEM
        history = client.get(f"/personas/{persona['id']}/events").json()
        assert [e["type"] for e in history] == ["PersonaCreated", "PersonaProfileChanged", "GenomeAssigned", "PersonaArchived"]


def test_a_stale_if_match_gets_412_and_changes_nothing(server: Server) -> None:
    with server.client() as client:
        persona = create_persona(client)
        client.patch(f"/personas/{persona['id']}", json={"description": "first"})
        stale = client.patch(f"/personas/{persona['id']}", json={"description": "second"}, headers={"If-Match": '"1"'})
        assert stale.status_code == 412 and stale.json()["current_version"] == 2
        assert client.get(f"/personas/{persona['id']}").json()["description"] == "first"


def test_an_idempotent_retry_returns_the_first_response_and_appends_nothing(server: Server) -> None:
    with server.client() as client:
        first = client.post("/personas", json={"name": "Ada"}, headers={"Idempotency-Key": "create-ada"})
        client.patch(f"/personas/{first.json()['id']}", json={"name": "Changed since"})
        retry = client.post("/personas", json={"name": "Ada"}, headers={"Idempotency-Key": "create-ada"})
        assert retry.status_code == 201 and retry.json() == first.json()
        assert len(client.get(f"/personas/{first.json()['id']}/events").json()) == 2
        assert len(client.get("/personas").json()["items"]) == 1


def test_an_idempotency_key_sent_again_with_another_body_gets_422_and_appends_nothing(server: Server) -> None:
    with server.client() as client:
        first = client.post("/personas", json={"name": "Ada"}, headers={"Idempotency-Key": "create-1"})
        other = client.post("/personas", json={"name": "Bob"}, headers={"Idempotency-Key": "create-1"})
        assert other.status_code == 422 and other.headers["content-type"] == PROBLEM
        assert other.json()["rule"] == "idempotency_key_mismatch" and "Idempotency-Key" in other.json()["detail"]
        assert [p["name"] for p in client.get("/personas").json()["items"]] == ["Ada"]
        retry = client.post("/personas", json={"name": "Ada"}, headers={"Idempotency-Key": "create-1"})
        assert retry.status_code == 201 and retry.json() == first.json()

        genome = create_genome(client, first.json()["id"])
        fork = f"/genomes/{genome['id']}/fork"
        forked = client.post(fork, json={"name": "child"}, headers={"Idempotency-Key": "fork-1"})
        assert forked.status_code == 201
        assert client.post(fork, json={"name": "other child"}, headers={"Idempotency-Key": "fork-1"}).status_code == 422
        assert client.post(fork, json={"name": "child"}, headers={"Idempotency-Key": "fork-1"}).json() == forked.json()
        assert len(client.get("/genomes").json()["items"]) == 2


def test_genome_time_travel_equals_the_state_at_that_version(server: Server) -> None:
    with server.client() as client:
        persona = create_persona(client)
        genome = create_genome(client, persona["id"])
        versions = [client.patch(f"/genomes/{genome['id']}", json={"description": f"v{n}"}).json() for n in range(2, 5)]
        for past in versions:
            replayed = client.get(f"/genomes/{genome['id']}", params={"version": past["version"]})
            assert replayed.json() == past and replayed.headers["etag"] == f'"{past["version"]}"'
            as_of = client.get(f"/genomes/{genome['id']}", params={"as_of": past["updated_at"]})
            assert as_of.json() == past
        assert client.get(f"/genomes/{genome['id']}", params={"version": 99}).status_code == 404


def test_genome_fork_list_filters_pagination_and_archive(server: Server) -> None:
    with server.client() as client:
        persona = create_persona(client)
        parent = create_genome(client, persona["id"], "parent")
        child = client.post(f"/genomes/{parent['id']}/fork", json={"name": "child"}).json()
        assert child["parent_ids"] == [parent["id"]] and child["generation"] == 1
        for n in range(3):
            create_genome(client, persona["id"], f"extra {n}")
        first = client.get("/genomes", params={"limit": 2, "persona_id": persona["id"]}).json()
        second = client.get("/genomes", params={"limit": 2, "cursor": first["next_cursor"]}).json()
        third = client.get("/genomes", params={"limit": 2, "cursor": second["next_cursor"]}).json()
        ids = [g["id"] for page in (first, second, third) for g in page["items"]]
        assert len(ids) == len(set(ids)) == 5 and third["next_cursor"] is None
        assert client.get("/genomes", params={"base_model": "other"}).json()["items"] == []
        assert client.delete(f"/genomes/{parent['id']}").status_code == 204
        assert client.get(f"/genomes/{parent['id']}").status_code == 410
        assert client.patch(f"/genomes/{parent['id']}", json={"name": "x"}).status_code == 409
        assert client.get(f"/genomes/{parent['id']}/events").status_code == 200


def test_two_servers_on_one_database_never_serve_a_row_the_other_changed(start_server) -> None:  # type: ignore[no-untyped-def]
    """Each process caches GETs by id until a commit: a write through one must show in the next read through the other."""
    first, second = start_server(), start_server()
    with first.client() as writer, second.client() as reader:
        persona = create_persona(writer)
        genome = create_genome(writer, persona["id"])
        path = f"/genomes/{genome['id']}"
        for n in range(1, 6):
            before = "main" if n == 1 else f"name {n - 1}"
            assert reader.get(path).json()["name"] == before  # now cached by the reader, and so is the list
            assert [g["name"] for g in reader.get("/genomes").json()["items"]] == [before]
            changed = writer.patch(path, json={"name": f"name {n}"})
            assert changed.status_code == 200, changed.text
            seen = reader.get(path)
            assert (seen.json()["name"], seen.headers["etag"]) == (f"name {n}", f'"{n + 1}"')
            assert [g["name"] for g in reader.get("/genomes").json()["items"]] == [f"name {n}"]
            assert reader.get(f"/personas/{persona['id']}").json()["name"] == "Ada"
            assert [p["name"] for p in reader.get("/personas").json()["items"]] == ["Ada"]
        renamed = writer.patch(f"/personas/{persona['id']}", json={"name": "Ada L."})
        assert renamed.status_code == 200, renamed.text
        assert [p["name"] for p in reader.get("/personas").json()["items"]] == ["Ada L."]
        assert writer.delete(path).status_code == 204
        assert reader.get(path).status_code == 410


def test_another_owners_resources_are_not_found(start_server) -> None:  # type: ignore[no-untyped-def]
    server: Server = start_server()
    alice, bob = (server.cli("keys", "create", "--owner", who).stdout.strip() for who in ("alice", "bob"))
    with server.client(alice) as a, server.client(bob) as b, server.client() as anonymous:
        persona = create_persona(a)
        genome = create_genome(a, persona["id"])
        assert anonymous.get(f"/personas/{persona['id']}").status_code == 401
        assert server.client("gsk_nope_nope").get("/personas").status_code == 401
        for path in (f"/personas/{persona['id']}", f"/genomes/{genome['id']}", f"/genomes/{genome['id']}/events"):
            assert b.get(path).status_code == 404
        assert b.patch(f"/genomes/{genome['id']}", json={"name": "mine now"}).status_code == 404
        assert b.post("/genomes", json={"persona_id": persona["id"], "base_model": "m", "name": "n"}).status_code == 404
        assert b.get("/genomes").json()["items"] == []
        assert a.get(f"/genomes/{genome['id']}").json()["owner"] == "alice"


@pytest.mark.parametrize(
    ("body", "status", "rule"),
    [
        (b"{not json", 400, "bad_request"),
        (b'{"name": 7}', 400, "bad_request"),
        (b'{"name": "x", "colour": "red"}', 400, "bad_request"),
        (b'{"name": ""}', 422, "name_required"),
        (b'{"name": "' + b"x" * 2_000_000 + b'"}', 413, "payload_too_large"),
    ],
)
def test_bad_input_gets_a_precise_problem_and_stores_nothing(server: Server, body: bytes, status: int, rule: str) -> None:
    with server.client() as client:
        response = client.post("/personas", content=body, headers={"content-type": "application/json"})
        assert response.status_code == status, response.text
        assert response.headers["content-type"] == PROBLEM
        assert response.json()["rule"] == rule
        assert client.get("/personas").json()["items"] == []
