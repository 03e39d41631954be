"""With API keys on, the console asks for a key once per tab and sends it on every call,
streams included; in open loopback mode (every other browser test) it never asks."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_browser import Watch, watched_page
from servers import Server, launch, stop


@pytest.fixture
def keyed_server(tmp_path: Path) -> Iterator[tuple[Server, str]]:
    processes: list[subprocess.Popen[str]] = []
    server = launch(tmp_path, processes, rate_limit_per_minute="0")
    key = server.cli("keys", "create", "--owner", "ada").stdout.strip()
    yield server, key
    stop(processes)


def test_the_console_asks_for_a_key_once_and_sends_it_on_every_call(chromium: Any, keyed_server: tuple[Server, str]) -> None:
    server, key = keyed_server
    with server.client() as keyless:  # the console's files need no key; the API does
        assert keyless.get("/").headers["location"] == "/console/" and keyless.get("/console/").status_code == 200
        assert keyless.get("/personas/").status_code == 401
    with server.client(key) as client:
        persona = client.post("/personas/", json={"name": "Keyed", "base_model": "smollm2-135m-instruct"}).json()
        session = client.post("/academy/sessions/", json={"persona_id": persona["id"], "goal": "Wait."}).json()
    watch = Watch(server.url)
    watch.expect_error("status of 401")  # the first call, before the page knows a key is needed
    sent: list[tuple[str, str | None]] = []
    with watched_page(chromium, server, watch) as page:
        page.on("request", lambda r: "/console" not in r.url and sent.append((r.url, r.headers.get("authorization"))))
        page.goto("/console/#/personas")
        dialog = page.get_by_role("dialog", name="API key")
        dialog.get_by_label("Key (gsk_...)").fill(key)
        asked = len(sent)  # the first page's calls so far, refused: one dialog asked for all of them
        dialog.get_by_role("button", name="Use this key").click()
        page.get_by_role("link", name="Keyed").wait_for()

        # The key stays for the tab: another page and a reload ask nothing more, the event stream included.
        page.goto(f"/console/#/academy/{session['id']}")
        page.reload()
        page.locator(".state[data-status=pending]").wait_for()
        page.get_by_role("heading", level=1, name="Session: Wait.").wait_for()
        assert page.get_by_role("dialog").count() == 0
    assert asked >= 1 and all(authorization is None for _, authorization in sent[:asked])
    assert all(authorization == f"Bearer {key}" for _, authorization in sent[asked:])
    assert any(url.endswith(f"/academy/sessions/{session['id']}/events") for url, _ in sent)
