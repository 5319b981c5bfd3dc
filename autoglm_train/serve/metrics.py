"""Prometheus metrics: requests, tokens, latency, time to first token, loaded modules.

``prometheus_client`` does the counting and the text exposition (format 0.0.4, ``generate_latest``). Each
app has its own ``CollectorRegistry``, not the process-wide default one, so several apps in one process
(tests, or two servers) neither collide on metric names nor share counts. What remains here is the choice
of metrics and labels, and a collector for the loaded modules, which are read from the engine at scrape
time because their label values (module, device) change while the server runs.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.registry import Collector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "autoglm"
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class _ModulesCollector(Collector):
    """``autoglm_module_loaded{module, device}``: 1 while a module's weights are in memory (else 0, device none)."""

    def __init__(self, modules: Callable[[], dict[str, str | None]]) -> None:
        self.modules = modules

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(
            f"{PREFIX}_module_loaded",
            "1 when a module's weights are in memory, by module and device.",
            labels=["module", "device"],
        )
        for module, device in self.modules().items():
            family.add_metric([module, device or "none"], int(device is not None))
        yield family


class Metrics:
    """All server metrics, in ``self.registry``. ``modules`` returns module → device (None while not loaded)."""

    def __init__(self, modules: Callable[[], dict[str, str | None]], routes: set[str]) -> None:
        self.routes = routes
        self.registry = registry = CollectorRegistry()
        p = PREFIX
        by = ["route", "method", "status"]
        self.requests = Counter(f"{p}_requests", "HTTP requests by route, method and status.", by, registry=registry)
        self.latency = Histogram(
            f"{p}_request_duration_seconds",
            "Time from request to the last response byte.",
            ["route"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.ttft = Histogram(
            f"{p}_time_to_first_token_seconds",
            "Time from request to the first generated token.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.tokens = Counter(f"{p}_tokens", "Tokens processed, by kind.", ["kind"], registry=registry)
        for kind in ("prompt", "completion"):  # both series exist (at 0) before the first request
            self.tokens.labels(kind=kind)
        self._cancelled = Counter(
            f"{p}_generations_cancelled", "Generations stopped early (client gone or error).", registry=registry
        )
        self._rate_limited = Counter(f"{p}_rate_limited", "Requests refused with 429.", registry=registry)
        self.in_flight = Gauge(f"{p}_requests_in_flight", "Requests being served now.", registry=registry)
        started = time.time()
        uptime = Gauge(f"{p}_uptime_seconds", "Seconds since the server started.", registry=registry)
        uptime.set_function(lambda: time.time() - started)
        registry.register(_ModulesCollector(modules))

    def route(self, path: str) -> str:
        """A bounded label: the path of a known route, else ``other``."""
        return path if path in self.routes else "other"

    def request_done(self, method: str, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        self.requests.labels(route=route, method=method, status=str(status)).inc()
        self.latency.labels(route=route).observe(seconds)

    def add_tokens(self, prompt: int, completion: int) -> None:
        self.tokens.labels(kind="prompt").inc(prompt)
        self.tokens.labels(kind="completion").inc(completion)

    def first_token(self, seconds: float) -> None:
        self.ttft.observe(seconds)

    def cancel(self) -> None:
        self._cancelled.inc()

    def limited(self) -> None:
        self._rate_limited.inc()

    @property
    def cancelled(self) -> int:
        """Generations cancelled so far (read back from the registry)."""
        return int(self.registry.get_sample_value(f"{PREFIX}_generations_cancelled_total") or 0)

    def render(self) -> bytes:
        """The registry in the Prometheus text format (``CONTENT_TYPE``)."""
        return generate_latest(self.registry)


class MetricsMiddleware:
    """Counts every HTTP request (errors from other middleware included) and times it to the last byte."""

    def __init__(self, app: ASGIApp, metrics: Metrics) -> None:
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500

        async def send_wrapper(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            with self.metrics.in_flight.track_inprogress():
                await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.request_done(scope["method"], scope["path"], status, time.perf_counter() - start)
