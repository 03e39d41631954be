"""Prometheus metrics: requests and latencies by route, the log's size and the projection lag.

Each app owns its registry (no process-wide state). Request metrics are counted
by a small ASGI middleware into plain numbers that a collector turns into
Prometheus families at scrape time: it runs on every request, and Litestar's
general-purpose Prometheus middleware cost a tenth of a GET, prometheus_client's
locked counters still a twentieth. The event-store figures are read from the database at scrape time, so
they are right whichever process appended: ``rate(genome_events_appended_total[1m])``
is the append rate.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator
from itertools import accumulate
from time import perf_counter

from litestar import Controller, Response, get
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from genome_service.services.bootstrap import Services
from genome_service.services.status import log_status

_LABELS = ("method", "path", "status_code")
_BOUNDS = Histogram.DEFAULT_BUCKETS  # the last is +Inf
_LE = [floatToGoString(bound) for bound in _BOUNDS]


class EventStoreCollector(Collector):
    def __init__(self, services: Services) -> None:
        self.services = services

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        status = log_status(self.services)
        yield CounterMetricFamily("genome_events_appended", "Events in the log (its last global position).", value=status.last_position)
        yield GaugeMetricFamily("genome_projection_lag_events", "Events the read models have not applied yet.", value=status.projection_lag)


class RequestStats(Collector):
    """Requests and their latencies by (method, route template, status).

    Each series is one list: count, sum of seconds, then a count per histogram bucket.
    Only the event loop's thread runs the middleware, so no lock is needed; a scrape
    reads a snapshot of the series.
    """

    def __init__(self) -> None:
        self._series: dict[tuple[str, str, int], list[float]] = {}

    def observe(self, method: str, path: str, status: int, seconds: float) -> None:
        series = self._series.get((method, path, status))
        if series is None:
            series = self._series[(method, path, status)] = [0] * (2 + len(_BOUNDS))
        series[0] += 1
        series[1] += seconds
        series[2 + bisect_left(_BOUNDS, seconds)] += 1

    def collect(self) -> Iterator[CounterMetricFamily | HistogramMetricFamily]:
        requests = CounterMetricFamily("genome_requests", "HTTP requests by route template and status.", labels=_LABELS)
        latency = HistogramMetricFamily("genome_request_duration_seconds", "HTTP request latency.", labels=_LABELS)
        for (method, path, status), series in list(self._series.items()):
            labels = [method, path, str(status)]
            requests.add_metric(labels, series[0])
            latency.add_metric(labels, list(zip(_LE, accumulate(series[2:]), strict=True)), series[1])
        yield requests
        yield latency


class RequestMetrics:
    def __init__(self, services: Services) -> None:
        self.registry = CollectorRegistry()
        self.stats = RequestStats()
        self.registry.register(self.stats)
        self.registry.register(EventStoreCollector(services))

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
                self.stats.observe(scope["method"], scope.get("path_template", scope["path"]), status, perf_counter() - start)

        return measured

    def controller(self, more: Callable[[], Awaitable[bytes]] | None = None) -> type[Controller]:
        """The `/metrics` route; `more` adds another exposition (the inference daemon's) after this process's."""
        registry = self.registry

        class MetricsController(Controller):
            path = "/metrics"
            tags = ["ops"]

            @get("/", operation_id="metrics", media_type=CONTENT_TYPE_LATEST)
            async def metrics(self) -> Response[bytes]:
                """Prometheus text exposition format (with a daemon, its per-model figures follow this process's)."""
                return Response(generate_latest(registry) + (await more() if more else b""), media_type=CONTENT_TYPE_LATEST)

        return MetricsController
