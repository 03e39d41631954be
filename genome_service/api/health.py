"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import msgspec
from litestar import Controller, get
from litestar.di import NamedDependency

from genome_service.services.bootstrap import Services
from genome_service.services.status import log_status


class Health(msgspec.Struct, frozen=True):
    status: str


class Readiness(msgspec.Struct, frozen=True):
    status: str
    last_position: int
    projection_checkpoint: int
    projection_lag: int


class HealthController(Controller):
    tags = ["ops"]

    @get("/health", operation_id="health", sync_to_thread=False)
    def health(self) -> Health:
        """The process is up."""
        return Health("ok")

    @get("/ready", operation_id="ready", sync_to_thread=False)
    def ready(self, services: NamedDependency[Services]) -> Readiness:
        """The database answers; reports how far the read models trail the log (503 when it does not answer)."""
        status = log_status(services)
        return Readiness(status="ready", last_position=status.last_position,
                         projection_checkpoint=status.projection_checkpoint, projection_lag=status.projection_lag)
