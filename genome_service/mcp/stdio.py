"""`genome-service mcp`: the MCP tools over stdio, in this process, as the owner of one API key.

The process opens the same database and data directory as the other commands. It loads the
model only on the first chat, and runs no Academy session itself: sessions it starts wait for
`serve` or an `academy worker`. The key is checked again on every call, so one revoked while a
client keeps this process open fails from the next call on.
"""

from __future__ import annotations

import anyio
from mcp.server.mcpserver import Context

from genome_service.chat.runtime import ChatRuntime
from genome_service.mcp.server import CallerOf, build, features_of
from genome_service.services.bootstrap import Services
from genome_service.services.context import OPEN_OWNER, Caller
from genome_service.services.errors import Unauthorized
from genome_service.services.keys import KeyStore


def key_holder(keys: KeyStore, key: str | None) -> CallerOf:
    """Who each call acts as: the key's owner, or ``local`` while no key exists (open mode)."""

    def caller_of(_ctx: Context | None) -> Caller:
        if key is None:
            if keys.any_active():
                raise Unauthorized("an API key is required: pass --key or set GENOME_API_KEY")
            return Caller(OPEN_OWNER)
        owner = keys.owner_of(key)
        if owner is None:
            raise Unauthorized("the API key is unknown or revoked")
        return Caller(owner)

    return caller_of


def serve_stdio(services: Services, key: str | None) -> None:
    """Answer MCP requests on stdin/stdout until the client closes them; raises ``Unauthorized`` first
    if the key would refuse every call."""
    caller_of = key_holder(services.keys, key)
    caller_of(None)
    runtime = ChatRuntime(services)
    server = build(features_of(services, runtime), caller_of)

    async def run() -> None:
        try:
            await server.run_stdio_async()
        finally:
            await runtime.close()

    anyio.run(run)
