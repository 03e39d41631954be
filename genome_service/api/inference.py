"""The inference engines' figures as JSON (operators, the console's Ops page), and adapters for a remote daemon."""

from __future__ import annotations

from typing import Annotated

from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.params import FromPath, HeaderParameter

from genome_service.api.auth import PUBLIC_ROUTE
from genome_service.chat.runtime import ChatRuntime, InferenceStats
from genome_service.services.context import Caller
from genome_service.services.layers import blob_for_daemon


class InferenceController(Controller):
    tags = ["ops"]
    runtime: ChatRuntime

    @get("/inference/stats", operation_id="inferenceStats")
    async def stats(self, caller: NamedDependency[Caller]) -> InferenceStats:
        """Queue, batch and LoRA-union figures of the engines (with a daemon: each model's worker too); per-persona figures for the caller's personas."""
        return await self.runtime.stats(caller.owner)

    # Not for API clients (outside the OpenAPI schema and API keys): the inference daemon
    # presents its own token.
    @get("/inference/blobs/{sha256:str}", operation_id="inferenceBlob", opt={PUBLIC_ROUTE: True},
         media_type="application/octet-stream", sync_to_thread=True, include_in_schema=False)
    def blob(self, sha256: FromPath[str], authorization: Annotated[str | None, HeaderParameter(name="Authorization")] = None) -> Response[bytes]:
        """An adapter blob by its SHA-256, for an inference daemon that shares no folder with the API (`Authorization: Bearer <GENOME_INFERENCE_TOKEN>`)."""
        return Response(blob_for_daemon(self.runtime.services, authorization, sha256), media_type="application/octet-stream")
