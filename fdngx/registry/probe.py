"""What the registry asks of a registered instance: is its /health 200, and does a port serve a usable
FastDeploy /metrics page. Bounded (connect/read timeouts, a total deadline, a byte cap), never through a
proxy, and never raising: each answer is None (yes) or the reason (no). Its client keeps idle keep-alive
connections only to the instances the inventory has: the periodic check closes the others' (keep_only).

Tests inject their own Probe, so a unit test never makes fdngx contact an address.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Sequence
from concurrent.futures import wait
from typing import Protocol

from fdngx.domain import Engine, Instance, hostport
from fdngx.engines import spec
from fdngx.inventory import address_key
from fdngx.weights.fetch import DEADLINE, Client, Fetch, HttpClient
from fdngx.weights.scrape import MAX_BYTES, load_from_metrics, parse_metrics, wanted_names

# fastdeploy/router/utils.py check_service_health: timeout=3; the Go router's default is 5
# (golang_router/internal/config/config.go HealthCheckTimeoutSecs).
HEALTH_TIMEOUT = 3.0
METRICS_TIMEOUT = 2.0
Address = tuple[str, int]  # an instance's canonical address (fdngx.inventory.address_key)


class Probe(Protocol):
    def health(self, host: str, port: int) -> str | None:
        """None when GET /health answers 200; else why not ("HTTP 404", "connection refused", ...)."""

    def metrics(self, host: str, port: int) -> str | None:
        """None when GET /metrics on `port` is a FastDeploy page with the load series; else why not."""

    def close(self) -> None: ...


class ProbeClient(HttpClient):
    """HttpClient, which keeps up to two idle keep-alive connections per address for as long as it lives, plus
    keep_only: the registry's instances come and go (a rollout on new ports), their sockets must not pile up."""

    def keep_only(self, addresses: Collection[Address]) -> None:
        """Close the idle connections to every address not in `addresses` (canonical). A connection in use is
        not idle: its GET gives it back when done, and the next keep_only closes it if its address is gone."""
        with self._lock:
            gone = [k for k in self._idle if address_key(*k) not in addresses]
            conns = [c for k in gone for c in self._idle.pop(k)]
        for conn in conns:
            conn.close()


def keep_only(probe: Probe, addresses: Collection[Address]) -> None:
    """After each periodic check: the probe's client closes its idle connections to instances no longer in the
    inventory (deregistered, expired, deleted from the file by hand). A metrics search's connection to a
    metrics port goes too: that search runs again a minute later at the soonest. So may the connection of a
    registration not written yet (no lock is held here): that costs its next GET one connect, nothing else. A
    test's probe has no ProbeClient."""
    client = getattr(probe, "client", None)
    if isinstance(client, ProbeClient):
        client.keep_only(addresses)


def health_all(probe: Probe, instances: Sequence[Instance], timeout: float) -> dict[Address, str | None]:
    """Probe.health of every instance (by canonical address), at once on the probe client's pool when it has
    one (one after the other when not: a test's probe); only the answers that came within `timeout` s."""
    keyed = [(address_key(i.host, i.port), i) for i in instances]
    pool = getattr(probe, "client", None)
    if pool is None or not hasattr(pool, "executor"):
        return {k: probe.health(i.host, i.port) for k, i in keyed}
    futures = {pool.executor().submit(probe.health, i.host, i.port): k for k, i in keyed}
    done, _ = wait(futures, timeout=timeout)
    return {futures[f]: f.result() for f in done}


def _late(error: str, timeout: float) -> str:
    """The shared client's error in a probe's words: its total deadline is the probe's timeout, not a scrape's."""
    return f"no answer within {timeout:g} s" if error == DEADLINE else error


class HttpProbe:
    def __init__(self, client: Client | None = None, health_timeout: float = HEALTH_TIMEOUT,
                 metrics_timeout: float = METRICS_TIMEOUT) -> None:
        self.client = client or ProbeClient()
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
            return _late(got.error, self.health_timeout)
        return None if got.status == 200 else f"HTTP {got.status}"

    def metrics(self, host: str, port: int) -> str | None:
        got = self._get(host, port, "/metrics", self.metrics_timeout, MAX_BYTES, False)
        if got.error is not None:
            return _late(got.error, self.metrics_timeout)
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
