"""Prometheus text metrics: requests, tokens, latency, time to first token, loaded modules.

Small enough to keep without ``prometheus_client``: counters and fixed-bucket histograms under
one lock, rendered in the text exposition format (version 0.0.4) at ``/metrics``.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections import Counter
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

PREFIX = "autoglm"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class Histogram:
    def __init__(self, buckets: tuple[float, ...] = LATENCY_BUCKETS) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value

    def lines(self, name: str, labels: str = "") -> list[str]:
        out, running = [], 0
        sep = "," if labels else ""
        for bound, count in zip((*self.buckets, float("inf")), self.counts, strict=True):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {running}')
        braces = f"{{{labels}}}" if labels else ""
        out += [f"{name}_sum{braces} {self.sum:.6f}", f"{name}_count{braces} {running}"]
        return out


class Metrics:
    """All server metrics. ``modules`` returns module → device (None while not loaded)."""

    def __init__(self, modules: Callable[[], dict[str, str | None]], routes: set[str]) -> None:
        self.lock = threading.Lock()
        self.modules = modules
        self.routes = routes
        self.requests: Counter[tuple[str, str, int]] = Counter()
        self.latency: dict[str, Histogram] = {}
        self.ttft = Histogram()
        self.tokens: Counter[str] = Counter()
        self.cancelled = 0
        self.rate_limited = 0
        self.in_flight = 0
        self.started = time.time()

    def route(self, path: str) -> str:
        """A bounded label: the path of a known route, else ``other``."""
        return path if path in self.routes else "other"

    def request_done(self, method: str, path: str, status: int, seconds: float) -> None:
        route = self.route(path)
        with self.lock:
            self.requests[(route, method, status)] += 1
            self.latency.setdefault(route, Histogram()).observe(seconds)

    def add_tokens(self, prompt: int, completion: int) -> None:
        with self.lock:
            self.tokens["prompt"] += prompt
            self.tokens["completion"] += completion

    def first_token(self, seconds: float) -> None:
        with self.lock:
            self.ttft.observe(seconds)

    def cancel(self) -> None:
        with self.lock:
            self.cancelled += 1

    def limited(self) -> None:
        with self.lock:
            self.rate_limited += 1

    def render(self) -> str:
        p = PREFIX
        with self.lock:
            lines = [
                f"# HELP {p}_requests_total HTTP requests by route, method and status.",
                f"# TYPE {p}_requests_total counter",
            ]
            for (route, method, status), n in sorted(self.requests.items()):
                lines.append(f'{p}_requests_total{{route="{route}",method="{method}",status="{status}"}} {n}')
            lines += [
                f"# HELP {p}_request_duration_seconds Time from request to the last response byte.",
                f"# TYPE {p}_request_duration_seconds histogram",
            ]
            for route, hist in sorted(self.latency.items()):
                lines += hist.lines(f"{p}_request_duration_seconds", f'route="{route}"')
            lines += [
                f"# HELP {p}_time_to_first_token_seconds Time from request to the first generated token.",
                f"# TYPE {p}_time_to_first_token_seconds histogram",
            ]
            lines += self.ttft.lines(f"{p}_time_to_first_token_seconds")
            lines += [f"# HELP {p}_tokens_total Tokens processed, by kind.", f"# TYPE {p}_tokens_total counter"]
            for kind in ("prompt", "completion"):
                lines.append(f'{p}_tokens_total{{kind="{kind}"}} {self.tokens[kind]}')
            lines += [
                f"# HELP {p}_generations_cancelled_total Generations stopped early (client gone or error).",
                f"# TYPE {p}_generations_cancelled_total counter",
                f"{p}_generations_cancelled_total {self.cancelled}",
                f"# HELP {p}_rate_limited_total Requests refused with 429.",
                f"# TYPE {p}_rate_limited_total counter",
                f"{p}_rate_limited_total {self.rate_limited}",
                f"# HELP {p}_requests_in_flight Requests being served now.",
                f"# TYPE {p}_requests_in_flight gauge",
                f"{p}_requests_in_flight {self.in_flight}",
                f"# HELP {p}_uptime_seconds Seconds since the server started.",
                f"# TYPE {p}_uptime_seconds gauge",
                f"{p}_uptime_seconds {time.time() - self.started:.1f}",
            ]
        lines += [
            f"# HELP {p}_module_loaded 1 when a module's weights are in memory, by module and device.",
            f"# TYPE {p}_module_loaded gauge",
        ]
        for module, device in self.modules().items():
            lines.append(
                f'{p}_module_loaded{{module="{module}",device="{device or "none"}"}} {int(device is not None)}'
            )
        return "\n".join(lines) + "\n"


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

        with self.metrics.lock:
            self.metrics.in_flight += 1
        try:
            await self.app(scope, receive, send_wrapper)
        finally:
            with self.metrics.lock:
                self.metrics.in_flight -= 1
            self.metrics.request_done(scope["method"], scope["path"], status, time.perf_counter() - start)
