"""Prometheus metrics: requests and latencies by route, the log's size and the projection lag.

Request metrics come from Litestar's Prometheus middleware. The event-store
figures are read from the database at scrape time, so they are right whichever
process (or worker) appended: ``rate(genome_events_appended_total[1m])`` is the
append rate.
"""

from __future__ import annotations

from collections.abc import Iterator

from litestar import Controller, Response, get
from litestar.plugins.prometheus import PrometheusConfig
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from genome_service.services.bootstrap import Services


class EventStoreCollector(Collector):
    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self.services.database.read() as connection:
            last = self.services.store.last_position(connection)
            checkpoint = self.services.projector.checkpoint(connection)
        yield CounterMetricFamily("genome_events_appended", "Events in the log (its last global position).", value=last)
        yield GaugeMetricFamily("genome_projection_lag_events", "Events the read models have not applied yet.", value=last - checkpoint)


class MetricsController(Controller):
    path = "/metrics"
    tags = ["ops"]

    @get("/", operation_id="metrics", media_type=CONTENT_TYPE_LATEST, sync_to_thread=False)
    def metrics(self) -> Response[bytes]:
        """Prometheus text exposition format."""
        return Response(generate_latest(REGISTRY), media_type=CONTENT_TYPE_LATEST)


def prometheus(services: Services) -> tuple[PrometheusConfig, EventStoreCollector]:
    config = PrometheusConfig(app_name="genome_service", prefix="genome", group_path=True, exclude=["/metrics"])
    return config, EventStoreCollector(services)


def register(collector: EventStoreCollector) -> None:
    REGISTRY.register(collector)


def unregister(collector: EventStoreCollector) -> None:
    REGISTRY.unregister(collector)
