"""API-key authentication: every request acts as one owner.

Keys travel as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. While no
key exists a server on loopback is open, acting as owner ``local``; the CLI refuses
to bind anything else in that state (see ``open_mode_is_safe``), and a server bound
elsewhere whose keys were all revoked refuses keyless requests rather than open up.
"""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.types import ASGIApp, Receive, Scope, Send

from genome_service.services.context import OPEN_OWNER, Caller
from genome_service.services.keys import KeyStore
from genome_service.settings import is_loopback

# The console's files are public too: the page asks for a key once the API answers 401.
PUBLIC_PATHS = ["/health", "/ready", "/metrics", "/schema", "/console"]
_PUBLIC_PREFIXES = tuple(PUBLIC_PATHS)
PUBLIC_ROUTE = "public"  # a handler's `opt` flag for a public route outside those paths (`/`)


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    return _raw_key(connection.scope["headers"])


class ApiKeyAuthentication:
    """Sets ``scope["user"]`` to the calling ``Caller``; a plain ASGI middleware that
    reads the raw headers, since it runs on every request."""

    def __init__(self, app: ASGIApp, keys: KeyStore, open_allowed: bool) -> None:
        self.app = app
        self.keys = keys
        self.open_allowed = open_allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and not _is_public(scope):
            scope["user"], scope["auth"] = self._caller(_raw_key(scope["headers"]))
        await self.app(scope, receive, send)

    def _caller(self, key: str | None) -> tuple[Caller, str | None]:
        if key is None:
            if not self.open_allowed or self.keys.any_active():
                raise NotAuthorizedException("an API key is required: send Authorization: Bearer <key>")
            return Caller(OPEN_OWNER), None
        owner = self.keys.owner_of(key)
        if owner is None:
            raise NotAuthorizedException("the API key is unknown or revoked")
        return Caller(owner), key


def _is_public(scope: Scope) -> bool:
    # The root is marked on its handler, not matched by path: routing has already cut a mount's
    # prefix off `path` (inside `/mcp` it is `/`).
    return scope["path"].startswith(_PUBLIC_PREFIXES) or scope["route_handler"].opt.get(PUBLIC_ROUTE, False)


def _raw_key(headers: list[tuple[bytes, bytes]]) -> str | None:
    for name, value in headers:
        if name == b"authorization" and value[:7].lower() == b"bearer ":
            return value[7:].strip().decode("latin-1")
        if name == b"x-api-key":
            return value.decode("latin-1")
    return None


def open_mode_is_safe(host: str, keys: KeyStore) -> bool:
    """Without keys anyone who can connect is an owner, so only loopback may listen."""
    return is_loopback(host) or keys.any_active()
