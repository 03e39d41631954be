"""The Litestar app factory: the one place the HTTP app is assembled."""

from __future__ import annotations

import logging

from litestar import Litestar
from litestar.di import Provide
from litestar.openapi import OpenAPIConfig

from genome_service.api.health import HealthController
from genome_service.services.bootstrap import Services, build
from genome_service.settings import Settings

log = logging.getLogger("genome_service")


def create_app(services: Services) -> Litestar:
    def provide_services() -> Services:
        return services

    def catch_up() -> None:
        # Events appended by a process that did not project inline (a crash, a bulk import).
        applied = services.projector.catch_up()
        if applied:
            log.info("read models caught up on %d events", applied)

    return Litestar(
        route_handlers=[HealthController],
        dependencies={"services": Provide(provide_services, sync_to_thread=False)},
        on_startup=[catch_up],
        on_shutdown=[services.close],
        openapi_config=OpenAPIConfig(title="Genome Service", version="0.1.0", path="/schema"),
    )


def create_app_from_env() -> Litestar:
    """Entry point for ASGI servers (``--factory``): settings come from ``GENOME_*``."""
    return create_app(build(Settings.from_env()))
