"""What the browser tests share: the page watch (requests, console errors, headers) and helpers.

A module of its own, not the conftest: `from conftest import ...` would find tests/e2e's
conftest whenever pytest loads both directories' conftests before importing the tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from servers import Server

from fixtures.make_adapter import make_adapter_files
from fixtures.make_model import tiny_spec
from genome_service.api.console import CONTENT_SECURITY_POLICY

SCREENSHOTS = Path(__file__).resolve().parents[2] / "console-screenshots"
MODEL = "tiny-llama"


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
