"""The inference engine's figures as JSON, for operators and the console's Ops page."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from genome_service.chat.runtime import ChatRuntime, InferenceStats
from genome_service.services.context import Caller


class InferenceController(Controller):
    tags = ["ops"]
    runtime: ChatRuntime

    @get("/inference/stats", operation_id="inferenceStats")
    async def stats(self, caller: NamedDependency[Caller]) -> InferenceStats:
        """Queue, batch and LoRA-union figures of the engines (with a daemon: each model's worker too); per-persona figures for the caller's personas."""
        return await self.runtime.stats(caller.owner)
