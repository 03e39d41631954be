"""The MCP server's streamable HTTP transport at `/mcp`, inside the REST API's app.

Behind the same key middleware as every route (the caller is the key's owner; open mode only
on loopback). Stateless: every request is answered on its own, so under `serve --workers N`
any process can take any request. What that costs: no server-initiated messages (progress
notifications, sampling, elicitation) and no resumable streams; each call is one JSON answer,
which is all these tools need, since long work returns an id to poll.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

from litestar import Litestar
from litestar.handlers import ASGIRouteHandler, asgi
from litestar.types import Receive, Scope, Send
from mcp.server.mcpserver import Context
from mcp.server.transport_security import TransportSecuritySettings

from genome_service.api.auth import is_loopback
from genome_service.mcp.server import Features, build
from genome_service.services.context import Caller

WILDCARD_HOSTS = ("0.0.0.0", "::", "")


def _caller(ctx: Context) -> Caller:
    return ctx.request_context.request.scope["user"]  # type: ignore[no-any-return,union-attr]  # set by ApiKeyAuthentication


def _security(host: str) -> TransportSecuritySettings:
    """DNS-rebinding protection for the server's own host: a page in a browser on this machine
    cannot reach a loopback server through a name it controls."""
    if is_loopback(host):
        hosts = ["127.0.0.1", "localhost", "[::1]"]
    elif host in WILDCARD_HOSTS:
        # Any name may reach a wildcard bind, and keys are required off loopback: the key is the guard.
        return TransportSecuritySettings(enable_dns_rebinding_protection=False)
    else:
        hosts = [f"[{host}]" if ":" in host else host]
    return TransportSecuritySettings(
        enable_dns_rebinding_protection=True, allowed_hosts=[f"{h}:*" for h in hosts] + hosts,
        allowed_origins=[f"http://{h}:*" for h in hosts] + [f"https://{h}:*" for h in hosts],
    )


def mcp_mount(features: Features, host: str) -> tuple[ASGIRouteHandler, Callable[[Litestar], AbstractAsyncContextManager[Any]]]:
    """The `/mcp` route and the lifespan that runs its session manager."""
    server = build(features, _caller)
    server.streamable_http_app(stateless_http=True, json_response=True, transport_security=_security(host), host=host)
    manager = server.session_manager

    @asgi("/mcp", is_mount=True, copy_scope=True)
    async def mcp(scope: Scope, receive: Receive, send: Send) -> None:
        """The Model Context Protocol (streamable HTTP): personas, knowledge, layers and the Academy as tools."""
        await manager.handle_request(scope, receive, send)  # type: ignore[arg-type]

    return mcp, lambda _app: manager.run()
