"""Prometheus metrics: requests and latencies by route, the log's size and the projection lag.

Each app owns its registry (no process-wide state). Request metrics are counted
by a small ASGI middleware that caches each label set's children: it runs on
every request, and Litestar's general-purpose Prometheus middleware cost a tenth
of a GET. The event-store figures are read from the database at scrape time, so
they are right whichever process appended: ``rate(genome_events_appended_total[1m])``
is the append rate.
"""

from __future__ import annotations

from collections.abc import Iterator
from time import perf_counter
from typing import Any

from litestar import Controller, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from genome_service.services.bootstrap import Services

_LABELS = ("method", "path", "status_code")


class EventStoreCollector(Collector):
    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        with self.services.database.read() as connection:
            last = self.services.store.last_position(connection)
            checkpoint = self.services.projector.checkpoint(connection)
        yield CounterMetricFamily("genome_events_appended", "Events in the log (its last global position).", value=last)
        yield GaugeMetricFamily("genome_projection_lag_events", "Events the read models have not applied yet.", value=last - checkpoint)


class RequestMetrics:
    def __init__(self, services: Services) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("genome_requests", "HTTP requests by route template and status.", _LABELS, registry=self.registry)
        self.latency = Histogram("genome_request_duration_seconds", "HTTP request latency.", _LABELS, registry=self.registry)
        self.registry.register(EventStoreCollector(services))
        self._children: dict[tuple[str, str, int], tuple[Any, Any]] = {}

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        key = (method, path, status)
        children = self._children.get(key)
        if children is None:
            children = self._children[key] = (self.requests.labels(*key), self.latency.labels(*key))
        children[0].inc()
        children[1].observe(seconds)

    def middleware(self, app: ASGIApp) -> ASGIApp:
        async def measured(scope: Scope, receive: Receive, send: Send) -> None:
            if scope["type"] != "http":
                await app(scope, receive, send)
                return
            status = 500

            async def send_capturing_status(message: Message) -> None:
                nonlocal status
                if message["type"] == "http.response.start":
                    status = message["status"]
                await send(message)

            start = perf_counter()
            try:
                await app(scope, receive, send_capturing_status)
            finally:
                # The route template, not the raw path: one series per route, not per id.
                self.observe(scope["method"], scope.get("path_template", scope["path"]), status, perf_counter() - start)

        return measured

    def controller(self) -> type[Controller]:
        registry = self.registry

        class MetricsController(Controller):
            path = "/metrics"
            tags = ["ops"]

            @get("/", operation_id="metrics", media_type=CONTENT_TYPE_LATEST, sync_to_thread=False)
            def metrics(self) -> Response[bytes]:
                """Prometheus text exposition format."""
                return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

        return MetricsController
