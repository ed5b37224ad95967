"""What the registry asks of a registered instance: is its /health 200, and does a port serve a usable
FastDeploy /metrics page. Bounded (connect/read timeouts, a total deadline, a byte cap), never through a
proxy, and never raising: each answer is None (yes) or the reason (no).

Tests inject their own Probe, so a unit test never makes fdngx contact an address.
"""

from __future__ import annotations

import time
from typing import Protocol

from fdngx.domain import Engine, hostport
from fdngx.engines import spec
from fdngx.weights.fetch import Client, Fetch, HttpClient
from fdngx.weights.scrape import MAX_BYTES, load_from_metrics, parse_metrics, wanted_names

# fastdeploy/router/utils.py check_service_health: timeout=3; the Go router's default is 5
# (golang_router/internal/config/config.go HealthCheckTimeoutSecs).
HEALTH_TIMEOUT = 3.0
METRICS_TIMEOUT = 2.0


class Probe(Protocol):
    def health(self, host: str, port: int) -> str | None:
        """None when GET /health answers 200; else why not ("HTTP 404", "connection refused", ...)."""

    def metrics(self, host: str, port: int) -> str | None:
        """None when GET /metrics on `port` is a FastDeploy page with the load series; else why not."""

    def close(self) -> None: ...


class HttpProbe:
    def __init__(self, client: Client | None = None, health_timeout: float = HEALTH_TIMEOUT,
                 metrics_timeout: float = METRICS_TIMEOUT) -> None:
        self.client = client or HttpClient()
        self.health_timeout = health_timeout
        self.metrics_timeout = metrics_timeout
        self.engine = spec(Engine.FASTDEPLOY)

    def _get(self, host: str, port: int, path: str, timeout: float, max_bytes: int, status_only: bool) -> Fetch:
        return self.client.get(
            f"http://{hostport(host, port)}{path}", connect_timeout=min(1.0, timeout), read_timeout=timeout,
            deadline=time.monotonic() + timeout, max_bytes=max_bytes, status_only=status_only,
        )

    def health(self, host: str, port: int) -> str | None:
        got = self._get(host, port, self.engine.health_path, self.health_timeout, 64 * 1024, True)
        if got.error is not None:
            return got.error
        return None if got.status == 200 else f"HTTP {got.status}"

    def metrics(self, host: str, port: int) -> str | None:
        got = self._get(host, port, "/metrics", self.metrics_timeout, MAX_BYTES, False)
        if got.error is not None:
            return got.error
        if got.status != 200:
            return f"HTTP {got.status}"
        try:
            text = got.body.decode("utf-8", "replace")
            load_from_metrics(parse_metrics(text, wanted_names(self.engine)), self.engine)
        except Exception as exc:  # the parser raises ValueError and friends part way through bad input
            return f"not a FastDeploy metrics page ({exc})"[:200]
        return None

    def close(self) -> None:
        self.client.close()
