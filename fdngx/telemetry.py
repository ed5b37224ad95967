"""The sidecar's own Prometheus metrics (served on --metrics-listen, default 127.0.0.1:9400).

A private registry, so importing fdngx never adds series to anyone else's default registry, and the
per-instance series of a replica that left the inventory are removed instead of freezing at old values.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from fdngx.errors import UsageError
from fdngx.policy import Decisions, PolicyState
from fdngx.scrape import LoadSample


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        lbl = ["instance"]
        self.up = Gauge("fdngx_instance_up", "1 when the instance is in rotation, 0 when marked down", lbl, registry=r)
        self.weight = Gauge("fdngx_instance_weight", "nginx weight currently applied", lbl, registry=r)
        self.running = Gauge("fdngx_instance_running", "Requests running, last scrape", lbl, registry=r)
        self.queued = Gauge("fdngx_instance_queued", "Requests queued/waiting, last scrape", lbl, registry=r)
        self.speed = Gauge(
            "fdngx_instance_speed", "Decode speed factor in the weight (1: near the fleet's median)", lbl, registry=r
        )
        self.kv = Gauge("fdngx_instance_kv_usage", "KV-cache usage 0..1, last scrape", lbl, registry=r)
        self.age = Gauge(
            "fdngx_instance_scrape_age_seconds", "Seconds since the last usable metrics scrape", lbl, registry=r
        )
        self.scrape_errors = Counter(
            "fdngx_instance_scrape_errors", "Scrapes whose metrics could not be used", lbl, registry=r
        )
        self.reloads = Counter("fdngx_reloads", "Config changes applied (nginx reloaded)", registry=r)
        self.reload_failures = Counter(
            "fdngx_reload_failures", "Applies (write + reload, or openresty push) that failed", registry=r
        )
        self.pushes = Counter("fdngx_pushes", "openresty flavor: weight/load pushes to the balancer", registry=r)
        self.apply_seconds = Histogram(
            "fdngx_apply_duration_seconds",
            "Render + write + nginx -t + reload + confirm",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=r,
        )
        self.cycle_seconds = Histogram(
            "fdngx_cycle_duration_seconds",
            "One scrape + policy (+ apply) cycle",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5),
            registry=r,
        )
        self.fail_open = Gauge("fdngx_fail_open", "1 while the policy fails open to static weights", registry=r)
        self.generation = Gauge(
            "fdngx_config_generation",
            "Generation of the config last applied (value 1)",
            ["generation"],
            registry=r,
        )
        self._known: set[str] = set()
        self._generation: str | None = None
        self._server: Any = None
        self._lock = threading.Lock()

    def observe(self, samples: Mapping[str, LoadSample], decisions: Decisions, state: PolicyState, now: float) -> None:
        names = {d.name for d in decisions}
        with self._lock:
            for gone in self._known - names:
                self._forget(gone)
            self._known = names
            self.fail_open.set(1 if decisions.fail_open else 0)
            for d in decisions:
                self.up.labels(d.name).set(0 if d.down else 1)
                self.weight.labels(d.name).set(d.weight)
                self.speed.labels(d.name).set(d.speed)
                s = samples.get(d.name)
                if s is not None and s.ok:
                    self.running.labels(d.name).set(s.running)
                    self.queued.labels(d.name).set(s.queued)
                    self.kv.labels(d.name).set(s.kv_usage if s.kv_usage is not None else float("nan"))
                else:
                    self.scrape_errors.labels(d.name).inc()
                st = state.instances.get(d.name)
                last = st.last_ok_at if st else None
                self.age.labels(d.name).set(now - last if last is not None else float("inf"))

    def _forget(self, name: str) -> None:
        gauges = (self.up, self.weight, self.speed, self.running, self.queued, self.kv, self.age)
        for metric in (*gauges, self.scrape_errors):
            with contextlib.suppress(KeyError):
                metric.remove(name)

    def applied(self, generation: str | None, seconds: float, reloaded: bool) -> None:
        self.apply_seconds.observe(seconds)
        if reloaded:
            self.reloads.inc()
        if generation and generation != self._generation:
            if self._generation is not None:
                self.generation.remove(self._generation)
            self.generation.labels(generation).set(1)
            self._generation = generation

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve /metrics on ADDR:PORT in a daemon thread; returns the bound address."""
        host, port = _listen_addr(listen)
        try:
            server, _thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise UsageError(f"--metrics-listen {listen}: cannot listen ({exc.strerror or exc})") from None
        self._server = server
        return host, server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def _listen_addr(listen: str) -> tuple[str, int]:
    """ADDR:PORT (or PORT) to bind; port 0 picks a free one (tests)."""
    raw = listen.strip()
    host, _, port_text = raw.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    if host == "*":
        host = "0.0.0.0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise UsageError(f"--metrics-listen '{listen}' must be ADDR:PORT or PORT (e.g. 127.0.0.1:9400)")
    return host, int(port_text)
