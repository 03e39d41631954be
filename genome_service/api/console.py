"""The web console's static files at `/console/`, `/` sending browsers there, and the
interactive API docs' own vendored Swagger UI files.

The console is a client of the REST API like any other: these routes only hand out files,
without a key (the page asks for one when the API answers 401). Every console response
carries a strict Content-Security-Policy, so a script slipped into the page cannot run and
the page cannot be framed.
"""

from __future__ import annotations

from importlib.resources import files
from pathlib import Path

from litestar import get
from litestar.openapi.plugins import SwaggerRenderPlugin
from litestar.response import Redirect
from litestar.static_files import create_static_files_router
from litestar.types import ASGIApp, ControllerRouterHandler, Message, Receive, Scope, Send

from genome_service.api.auth import PUBLIC_ROUTE

CONSOLE_PATH = "/console"
SWAGGER_UI_PATH = "/schema/swagger-ui"
CONTENT_SECURITY_POLICY = "default-src 'self'; script-src 'self'; object-src 'none'; base-uri 'none'; frame-ancestors 'none'"
SECURITY_HEADERS = (
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
)


def _package_folder(package: str) -> Path:
    # The files live inside the installed package (wheel or editable), never next to the cwd.
    return Path(str(files(package)))


def security_headers(app: ASGIApp) -> ASGIApp:
    """Adds the console's security headers to every response, error responses included."""

    async def middleware(scope: Scope, receive: Receive, send: Send) -> None:
        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *SECURITY_HEADERS]
            await send(message)

        await app(scope, receive, send_with_headers)

    return middleware


@get("/", include_in_schema=False, sync_to_thread=False, middleware=[security_headers], opt={PUBLIC_ROUTE: True})
def to_console() -> Redirect:
    """A browser opening the server's address lands on the console."""
    return Redirect(f"{CONSOLE_PATH}/")


def console_routes() -> list[ControllerRouterHandler]:
    """The console's files (index.html for `/console/`), `/`, and Swagger UI's files for `/schema/swagger`."""
    console = create_static_files_router(
        CONSOLE_PATH, [_package_folder("genome_service.console") / "static"], html_mode=True,
        name="console", middleware=[security_headers],
    )
    swagger = create_static_files_router(
        SWAGGER_UI_PATH, [_package_folder("genome_service.api") / "swagger_ui"], name="swagger-ui",
        middleware=[security_headers],
    )
    return [console, swagger, to_console]


def offline_swagger() -> SwaggerRenderPlugin:
    """Swagger UI from the files shipped in the package: the docs work with no internet."""
    return SwaggerRenderPlugin(
        js_url=f"{SWAGGER_UI_PATH}/swagger-ui-bundle.js",
        css_url=f"{SWAGGER_UI_PATH}/swagger-ui.css",
        standalone_preset_js_url=f"{SWAGGER_UI_PATH}/swagger-ui-standalone-preset.js",
        favicon=f"<link rel='icon' type='image/png' href='{SWAGGER_UI_PATH}/favicon-32x32.png'>",
    )
