"""How far the read models trail the log: what readiness probes and metrics report."""

from __future__ import annotations

import msgspec
from sqlalchemy.exc import SQLAlchemyError

from genome_service.eventstore.errors import DatabaseUnavailable
from genome_service.services.bootstrap import Services


class LogStatus(msgspec.Struct, frozen=True):
    last_position: int
    projection_checkpoint: int

    @property
    def projection_lag(self) -> int:
        return self.last_position - self.projection_checkpoint


def log_status(services: Services) -> LogStatus:
    """The log's head and the projections' checkpoint, read in one snapshot; raises
    ``DatabaseUnavailable`` when the database does not answer, whatever the driver said."""
    try:
        with services.database.read() as connection:
            return LogStatus(services.store.last_position(connection), services.projector.checkpoint(connection))
    except SQLAlchemyError as error:
        raise DatabaseUnavailable(f"the database does not answer: {type(error).__name__}") from error
