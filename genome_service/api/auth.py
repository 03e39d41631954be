"""API-key authentication: every request acts as one owner.

Keys travel as ``Authorization: Bearer <key>`` or ``X-API-Key: <key>``. While no
key exists the server is open, acting as owner ``local``; the CLI refuses to
bind anything but loopback in that state (see ``open_mode_is_safe``).
"""

from __future__ import annotations

import ipaddress
from typing import Any

import msgspec
from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException
from litestar.middleware.authentication import (
    AbstractAuthenticationMiddleware,
    AuthenticationResult,
)
from litestar.types import ASGIApp

from genome_service.services.keys import KeyStore

OPEN_OWNER = "local"
PUBLIC_PATHS = ["/health", "/ready", "/metrics", "/schema"]


class Caller(msgspec.Struct, frozen=True):
    owner: str


def presented_key(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    header = connection.headers.get("authorization")
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return connection.headers.get("x-api-key")


class ApiKeyAuthentication(AbstractAuthenticationMiddleware):
    def __init__(self, app: ASGIApp, keys: KeyStore) -> None:
        super().__init__(app, exclude=PUBLIC_PATHS)
        self.keys = keys

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        key = presented_key(connection)
        if key is None:
            if self.keys.any_active():
                raise NotAuthorizedException("an API key is required: send Authorization: Bearer <key>")
            return AuthenticationResult(user=Caller(OPEN_OWNER), auth=None)
        owner = self.keys.owner_of(key)
        if owner is None:
            raise NotAuthorizedException("the API key is unknown or revoked")
        return AuthenticationResult(user=Caller(owner), auth=key)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def open_mode_is_safe(host: str, keys: KeyStore) -> bool:
    """Without keys anyone who can connect is an owner, so only loopback may listen."""
    return is_loopback(host) or keys.any_active()
