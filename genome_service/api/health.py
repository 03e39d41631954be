"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import msgspec
from litestar import Controller, Response, get
from litestar.di import NamedDependency
from litestar.status_codes import HTTP_200_OK
from sqlalchemy.exc import SQLAlchemyError

from genome_service.eventstore.errors import DatabaseUnavailable
from genome_service.services.bootstrap import Services


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
    def ready(self, services: NamedDependency[Services]) -> Response[Readiness]:
        """The database answers; reports how far the read models trail the log (503 when it does not answer)."""
        try:
            with services.database.read() as connection:
                last = services.store.last_position(connection)
                checkpoint = services.projector.checkpoint(connection)
        except SQLAlchemyError as error:
            # Answered as database_unavailable (503, Retry-After) like any request that meets it.
            raise DatabaseUnavailable(f"the database does not answer: {type(error).__name__}") from error
        return Response(Readiness("ready", last, checkpoint, last - checkpoint), status_code=HTTP_200_OK)


