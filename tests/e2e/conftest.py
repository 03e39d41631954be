"""The real server, started as its own process and spoken to over HTTP (see tests/servers.py)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from servers import Server, launch, stop


@pytest.fixture
def start_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    processes: list[subprocess.Popen[str]] = []

    def start(database_url: str | None = None, **settings: str | None) -> Server:
        return launch(tmp_path, processes, database_url, **settings)

    yield start
    stop(processes)


@pytest.fixture
def server(start_server: Callable[..., Server]) -> Server:
    """A server on a fresh embedded SQLite database, open on loopback (no keys)."""
    return start_server()
