"""The real server, started as its own process and spoken to over HTTP (the e2e and browser tests)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import httpx
import pytest

from genome_service.eventstore.migrations import upgrade

CLI = [sys.executable, "-m", "genome_service.cli"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GENOME_")}
    return env | {"GENOME_DATA_DIR": str(tmp_path / "data"), **extra}


def _drain(stream: IO[str], log: Path) -> None:
    with log.open("a") as out:
        for line in stream:
            out.write(line)
            out.flush()


class Server:
    def __init__(self, url: str, env: dict[str, str], process: subprocess.Popen[str] | None = None) -> None:
        self.url = url
        self.env = env
        self.process = process

    def client(self, key: str | None = None) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*CLI, *args], env=self.env, capture_output=True, text=True, timeout=120)


def launch(tmp_path: Path, processes: list[subprocess.Popen[str]], database_url: str | None = None,
           **settings: str | None) -> Server:
    """`genome-service serve` on a free loopback port with GENOME_* settings, once it accepts connections."""
    # No academy worker unless a test asks (None: the service's default): a fuzzed or stray
    # session must not start a long training. Inference in the API process unless a test asks
    # for the daemon (inference_daemon="embedded", the service's default): its first model worker
    # waits for a forkserver importing torch, ~7 s more for every server that chats on 2 cores. Tests
    # about the daemon, the streaming chat, the console and the academy API's defaults ask.
    settings = {"academy_worker": "off", "inference_daemon": "off", **settings}
    port = int(settings.pop("port", None) or free_port())  # a test may need the URL before the server
    env = clean_env(tmp_path, **{f"GENOME_{k.upper()}": v for k, v in settings.items() if v is not None})
    if database_url:
        env["GENOME_DATABASE_URL"] = database_url
    else:
        (tmp_path / "data").mkdir(exist_ok=True)
        upgrade(f"sqlite:///{tmp_path / 'data' / 'genome.db'}")
    process = subprocess.Popen([*CLI, "serve", "--port", str(port)], env=env, stderr=subprocess.PIPE, text=True)
    processes.append(process)
    assert process.stderr is not None
    log = tmp_path / f"server-{port}.log"
    # uvicorn says when it listens (the embedded daemon's says its own port); with several
    # workers each then says when it accepts connections.
    workers, listening, started = int(settings.get("workers") or 1), False, 0
    for line in process.stderr:
        listening = listening or f"Uvicorn running on http://127.0.0.1:{port}" in line
        started += listening and workers > 1 and "Application startup complete" in line
        if listening and (workers == 1 or started == workers):
            # Keep reading: a server that logs a lot later (a fuzzed request's errors) must
            # never block on a full pipe. What it writes lands in a file for failing tests.
            threading.Thread(target=_drain, args=(process.stderr, log), daemon=True).start()
            return Server(f"http://127.0.0.1:{port}", env, process)
    pytest.fail(f"server exited with {process.wait()}")


def stop(processes: list[subprocess.Popen[str]]) -> None:
    for process in processes:
        process.terminate()
        process.wait(timeout=30)
