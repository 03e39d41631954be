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
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from servers import Server, launch, stop

from fixtures.make_adapter import make_adapter_files
from fixtures.make_model import tiny_spec
from genome_service.api.console import CONTENT_SECURITY_POLICY
from inference.models import ModelCatalog

IN_CI = os.environ.get("CI", "").lower() == "true"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "console-screenshots"
MODEL = "tiny-llama"


def _missing(reason: str) -> None:
    if IN_CI:
        pytest.fail(f"CI=true but {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="session")
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
                 academy_checkpoint_every="5", rate_limit_per_minute="0")
    stop(processes)


class Watch:
    """What a page did that the tests forbid: requests off the server, console errors, missing headers."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.foreign: list[str] = []
        self.errors: list[str] = []
        self.headers: list[str] = []
        self.console_responses = 0
        self.expected: list[str] = []

    def expect_error(self, text: str) -> None:
        """A console error the test provokes on purpose (Chromium logs every 4xx response)."""
        self.expected.append(text)

    def unexpected_errors(self) -> list[str]:
        return [e for e in self.errors if not any(text in e for text in self.expected)]

    def route(self, route: Any) -> None:
        if route.request.url.startswith(f"{self.origin}/"):
            route.continue_()
        else:
            self.foreign.append(route.request.url)
            route.abort()

    def response(self, response: Any) -> None:
        path = response.url.removeprefix(self.origin)
        if path == "/" or path.startswith("/console"):
            self.console_responses += 1
            headers = response.headers
            if headers.get("content-security-policy") != CONTENT_SECURITY_POLICY or headers.get("x-content-type-options") != "nosniff":
                self.headers.append(f"{path}: {headers.get('content-security-policy')!r}")


@pytest.fixture
def watch(console_server: Server) -> Watch:
    return Watch(console_server.url)


@contextmanager
def watched_page(chromium: Any, server: Server, watch: Watch) -> Iterator[Any]:
    """A page in a fresh browser context (its own sessionStorage), failing on what `Watch` forbids."""
    context = chromium.new_context(base_url=server.url, viewport={"width": 1280, "height": 900})
    context.route("**/*", watch.route)
    page = context.new_page()
    page.on("console", lambda message: message.type == "error" and watch.errors.append(message.text))
    page.on("pageerror", lambda error: watch.errors.append(f"uncaught: {error}"))
    page.on("response", watch.response)
    page.set_default_timeout(20_000)
    yield page
    context.close()
    assert watch.foreign == [], "requests left the server"
    assert watch.headers == [], "console responses without the security headers"
    assert watch.unexpected_errors() == [], "console errors"


@pytest.fixture
def page(chromium: Any, console_server: Server, watch: Watch) -> Iterator[Any]:
    with watched_page(chromium, console_server, watch) as page:
        yield page


def open_page(page: Any, hash_route: str, heading: str) -> None:
    page.goto(f"/console/{hash_route}")
    page.get_by_role("heading", level=1, name=heading).wait_for()


def screenshot(page: Any, name: str) -> None:
    SCREENSHOTS.mkdir(exist_ok=True)
    page.screenshot(path=str(SCREENSHOTS / f"{name}.png"), full_page=True)


def upload_files(folder: Path, files: dict[str, bytes]) -> list[str]:
    """The files written into `folder`, as paths for a file input."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return [str(folder / name) for name in files]


def tiny_adapter(tiny_model: Path, seed: int = 0) -> dict[str, bytes]:
    return make_adapter_files("peft", rank=4, spec=tiny_spec(tiny_model, MODEL), seed=seed)
