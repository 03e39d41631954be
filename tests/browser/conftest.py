"""The console in a real browser: Playwright drives Debian's Chromium (never a downloaded one)
against the real server process on loopback.

Every page a test opens is watched: a request to anything but the server fails the test (and is
refused before it leaves), so does a console error or an uncaught exception, and every console
response must carry the exact security headers. Without Chromium these tests are skipped and
say why, except under CI=true, where `scripts/test` has installed it and a skip would hide a gap.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from console_browser import MODEL, Watch, watched_page
from servers import Server, launch, stop

from inference.models import ModelCatalog

IN_CI = os.environ.get("CI", "").lower() == "true"


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


# Per module, never per session: while Playwright's sync API is open its event loop runs on the
# main thread, where later tests (asyncio.run, anyio.run) must start loops of their own.
@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    path = shutil.which("chromium")
    if path is None:
        _missing("Debian's chromium is not installed (`apt-get install chromium`, as root; ./scripts/test does it)")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _missing("playwright is not installed (the project's test extras)")
    with sync_playwright() as playwright:
        # As the machine's own Chromium is started elsewhere: no background calls home.
        browser = playwright.chromium.launch(executable_path=path, args=[
            "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
            "--disable-component-update", "--disable-sync"])
        yield browser
        browser.close()


@pytest.fixture(scope="session")
def console_server(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Server]:
    """One server for the browser tests: the tiny random Llama (fast tokens and training), the
    academy worker that `serve` runs itself on SQLite, progress every 5 steps."""
    tmp_path = tmp_path_factory.mktemp("console")
    ModelCatalog(tmp_path / "models").register_local(MODEL, tiny_model)
    processes: list[subprocess.Popen[str]] = []
    yield launch(tmp_path, processes, models_dir=str(tmp_path / "models"), inference_model=MODEL, inference_backend="torch",
                 inference_device="cpu", academy_worker=None, academy_challenges="3", academy_keep_score="0",
                 academy_checkpoint_every="5", rate_limit_per_minute="0", inference_daemon="embedded")
    stop(processes)


@pytest.fixture
def watch(console_server: Server) -> Watch:
    return Watch(console_server.url)


@pytest.fixture
def page(chromium: Any, console_server: Server, watch: Watch) -> Iterator[Any]:
    with watched_page(chromium, console_server, watch) as page:
        yield page
