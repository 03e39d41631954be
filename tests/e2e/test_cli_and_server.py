"""The command line and the real server process, spoken to over HTTP."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

CLI = [sys.executable, "-m", "genome_service.cli"]
COMMANDS = [
    [], ["serve"], ["db"], ["db", "upgrade"], ["db", "downgrade"], ["db", "current"],
    ["projections"], ["projections", "status"], ["projections", "catch-up"], ["projections", "rebuild"],
    ["events"], ["events", "tail"], ["keys"], ["keys", "create"], ["keys", "list"], ["keys", "revoke"],
]


def run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=env, capture_output=True, text=True, timeout=120)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("GENOME_")}
    return clean | {"GENOME_DATA_DIR": str(tmp_path / "data")}


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "root")
def test_every_command_has_help_with_an_example(command: list[str], env: dict[str, str]) -> None:
    result = run(*command, "--help", env=env)
    assert result.returncode == 0, result.stderr
    assert "Usage: genome-service" in result.stdout
    assert "Example: genome-service" in result.stdout


def test_user_errors_exit_1_and_system_errors_exit_2_with_the_reason_on_stderr(env: dict[str, str]) -> None:
    unknown = run("frobnicate", env=env)
    assert unknown.returncode == 1 and "No such command" in unknown.stderr
    not_migrated = run("projections", "status", env=env)
    assert not_migrated.returncode == 1 and "db upgrade" in not_migrated.stderr
    bad_setting = run("db", "current", env=env | {"GENOME_PORT": "eighty"})
    assert bad_setting.returncode == 1 and "GENOME_PORT" in bad_setting.stderr
    unreachable = run("--database-url", "postgresql://nobody@127.0.0.1:9/none", "projections", "status", env=env)
    assert unreachable.returncode == 2 and "connection" in unreachable.stderr.lower()


def test_upgrade_then_rebuild_and_tail_an_empty_log(env: dict[str, str]) -> None:
    assert run("db", "upgrade", env=env).returncode == 0
    rebuilt = run("--quiet", "projections", "rebuild", env=env)
    assert rebuilt.returncode == 0 and rebuilt.stderr == ""
    tail = run("events", "tail", env=env)
    assert tail.returncode == 0 and tail.stdout == ""


def test_the_server_answers_health_ready_and_its_openapi_schema(server) -> None:  # type: ignore[no-untyped-def]
    server = server.url
    assert httpx.get(f"{server}/health").json() == {"status": "ok"}
    ready = httpx.get(f"{server}/ready").json()
    assert ready == {"status": "ready", "last_position": 0, "projection_checkpoint": 0, "projection_lag": 0}
    assert httpx.get(f"{server}/schema/openapi.json").json()["info"]["title"] == "Genome Service"


def test_events_tail_prints_the_log_as_json_lines_and_projections_status_shows_no_lag(server) -> None:  # type: ignore[no-untyped-def]
    import json

    with server.client() as client:
        persona = client.post("/personas", json={"name": "Ada"}).json()
        client.patch(f"/personas/{persona['id']}", json={"description": "a tail"})
    lines = [json.loads(line) for line in server.cli("events", "tail").stdout.splitlines()]
    assert [(e["position"], e["type"], e["stream_id"]) for e in lines] == [
        (1, "PersonaCreated", persona["id"]), (2, "PersonaProfileChanged", persona["id"]),
    ]
    assert lines[1]["event"]["description"] == "a tail" and lines[0]["metadata"]["actor"] == "local"
    only_after = server.cli("events", "tail", "--after", "1").stdout.splitlines()
    assert len(only_after) == 1
    assert "lag: 0" in server.cli("projections", "status").stdout
