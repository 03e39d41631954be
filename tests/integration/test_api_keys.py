"""API keys across processes: each KeyStore here has its own Database, as another process would."""

from __future__ import annotations

from pathlib import Path

from litestar.testing import TestClient

from genome_service.api.app import create_app
from genome_service.eventstore.database import Database
from genome_service.services.bootstrap import build
from genome_service.services.keys import KeyStore
from genome_service.settings import Settings


def test_a_first_key_made_elsewhere_closes_open_mode_by_the_time_create_returns(database_url: str) -> None:
    server, cli = KeyStore(Database(database_url)), KeyStore(Database(database_url))
    assert server.any_active() is False  # the server now trusts this answer for a while
    cli.create("alice")
    assert server.any_active() is True


def test_a_key_revoked_elsewhere_stops_working_on_the_next_request(database_url: str) -> None:
    server, cli = KeyStore(Database(database_url)), KeyStore(Database(database_url))
    key = cli.create("alice")
    assert server.owner_of(key.secret) == "alice"
    assert cli.revoke(key.key_id) is True
    assert server.owner_of(key.secret) is None


def test_keys_made_in_this_process_count_at_once(database_url: str) -> None:
    keys = KeyStore(Database(database_url))
    assert keys.any_active() is False
    key = keys.create("alice")
    assert keys.any_active() is True
    keys.revoke(key.key_id)
    assert keys.any_active() is False


def test_a_server_bound_beyond_loopback_refuses_keyless_requests_even_with_no_key_left(
    database: Database, tmp_path: Path,
) -> None:
    services = build(Settings(data_dir=tmp_path, database_url=database.url, host="0.0.0.0", academy_worker="off"), database=database)
    key = services.keys.create("alice")
    services.keys.revoke(key.key_id)
    with TestClient(create_app(services)) as client:
        refused = client.get("/personas")
        assert refused.status_code == 401 and refused.json()["rule"] == "unauthorized"
        assert client.get("/health").status_code == 200
