"""The real server while its database cannot be reached: 503 problem+json with Retry-After, never 500,
and the same process serving again once the database is back."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import httpx
import pytest
from outages import postgres_database, sqlite_locked
from servers import Server

PROBLEM = "application/problem+json"


def _create_persona(client: httpx.Client, name: str) -> str:
    response = client.post("/personas", json={"name": name})
    assert response.status_code == 201, response.text
    return response.json()["id"]


def _assert_database_unavailable(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == PROBLEM
    assert response.json()["rule"] == "database_unavailable"
    assert int(response.headers["retry-after"]) >= 1


def _outage_and_recovery(server: Server, outage: Callable[[], AbstractContextManager[None]]) -> None:
    with server.client() as client:
        ada = _create_persona(client, "Ada")
        assert client.get("/ready").status_code == 200
        with outage():
            _assert_database_unavailable(client.post("/personas", json={"name": "Bob"}))
            _assert_database_unavailable(client.get(f"/personas/{ada}"))
            _assert_database_unavailable(client.get("/personas"))
            _assert_database_unavailable(client.patch(f"/personas/{ada}", json={"description": "during"}))
            _assert_database_unavailable(client.get("/ready"))
        assert client.get("/ready").status_code == 200
        assert client.get(f"/personas/{ada}").json()["name"] == "Ada"
        bob = _create_persona(client, "Bob")
        assert client.patch(f"/personas/{ada}", json={"description": "after"}).status_code == 200
        assert {p["id"] for p in client.get("/personas").json()["items"]} == {ada, bob}


def test_a_locked_sqlite_database_answers_503_and_the_server_recovers_when_the_lock_is_released(
    start_server: Callable[..., Server], tmp_path: Path,
) -> None:
    server = start_server(sqlite_busy_timeout="0.3", read_cache="false")
    _outage_and_recovery(server, lambda: sqlite_locked(tmp_path / "data" / "genome.db"))


@pytest.mark.postgres
def test_a_closed_postgres_database_answers_503_and_the_server_recovers_when_it_reopens(
    start_server: Callable[..., Server], postgres_server: str,
) -> None:
    with postgres_database(postgres_server) as database:
        _outage_and_recovery(start_server(database_url=database.url), database.closed)
