"""Where a registered FastDeploy instance's load signal comes from when its registration names no metrics
port (fdngx.registry.core): the search, the order it tries, and what it says about it, once per instance.

FastDeploy answers /metrics on its API port from a forked web worker whose load gauges may read 0
(docs/fastdeploy.md: give every instance its own --metrics-port), so that port comes after
--registry-metrics-port and is marked "api-port-suspect". The state here (when an instance was last looked
at, what was said) is per address; fdngx.registry.core forgets an instance's when it removes it, and each
periodic check drops the state of instances no longer in the file (deleted by hand): keep_only.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import Counter
from collections.abc import Collection, Iterator

from fdngx.domain import Instance
from fdngx.registry.body import Registration
from fdngx.registry.probe import Probe
from fdngx.registry.rules import RegistrySettings

log = logging.getLogger("fdngx.registry")
Key = tuple[str, int]  # an instance's address (fdngx.inventory.address_key)
# metrics_source values: "body", "rule", "none" and "api-port-suspect" (written now), and "api-port" (written
# before the API port came last; an inventory on disk keeps it and it is read like "api-port-suspect").
API_PORT_SOURCES = ("api-port-suspect", "api-port")


class MetricsPorts:
    """The metrics port search, with what it remembers per instance address."""

    def __init__(self) -> None:
        self._probed: dict[Key, float] = {}  # last metrics search for an instance without a load signal
        self._warned: set[Key] = set()
        self._suspect_said: set[Key] = set()  # "api-port-suspect": said once per instance
        self._lock = threading.Lock()  # over _in_flight, and keep_only's pruning
        self._in_flight: Counter[Key] = Counter()  # registrations between their find() and their write

    def forget(self, key: Key) -> None:
        self._probed.pop(key, None)
        self._warned.discard(key)
        self._suspect_said.discard(key)

    @contextlib.contextmanager
    def registering(self, key: Key) -> Iterator[None]:
        """Around one registration's find() and its write to the inventory: keep_only leaves its state alone."""
        with self._lock:
            self._in_flight[key] += 1
        try:
            yield
        finally:
            with self._lock:
                self._in_flight[key] -= 1
                if self._in_flight[key] <= 0:
                    del self._in_flight[key]

    def keep_only(self, keys: Collection[Key]) -> None:
        """Forget every instance that is neither in `keys` (the registered ones in the inventory just read) nor
        being registered. The race this avoids: find() runs without the registry's lock and before the
        registration writes the file, so a check that reads the file in between does not see the instance yet;
        pruning it then would lose what find() just said (its WARNING said again on the next search). The
        caller holds the registry's lock from its read through this call, so no write lands in between: an
        instance is in what it read, or its registration has not written yet and is still in flight here."""
        with self._lock:
            kept = {*keys, *self._in_flight}  # each a C-level copy under the GIL, as find() may add meanwhile
            for key in {*self._probed, *self._warned, *self._suspect_said} - kept:
                self.forget(key)

    def find(self, probe: Probe, settings: RegistrySettings, now: float, reg: Registration, host: str,
             asked: str | None, current: Instance | None, key: Key, name: str) -> tuple[int, str]:
        """(metrics port, source): the body's; else kept from before; else --registry-metrics-port; else
        /metrics on the API port, "api-port-suspect" (FastDeploy answers it from a forked web worker whose
        load gauges may read 0: one WARNING per instance); else none (one WARNING per instance). An
        API-port source kept from before gives way to a rule that gives a port. A body's metrics port equal to
        its API port is no port of its own: FastDeploy's newer bodies send the API port when the instance has
        no --metrics-port (config.py RouterConfig), which is the API-port case, not a trusted source."""
        if reg.metrics_port is not None and reg.metrics_port != reg.port:
            return reg.metrics_port, "body"
        source = current.extra.get("metrics_source") if current is not None else None
        rule = settings.metrics_rule
        port = rule.port_for([host, *([asked] if asked else [])], reg.port) if rule else None
        if current is not None and source == "rule":
            return current.metrics_port, "rule"
        if current is not None and source in API_PORT_SOURCES and port is None:
            self._say_suspect(key, name, current.metrics_port)
            return current.metrics_port, str(source)
        recent = now - self._probed.get(key, -1e18) < settings.reprobe_after
        if current is not None and source == "none" and recent:
            return current.metrics_port, "none"
        self._probed[key] = now
        if rule is not None and port is not None:
            rule_why = probe.metrics(host, port)
            if rule_why is not None and key not in self._warned:
                self._warned.add(key)
                log.warning("registry: %s: metrics port %d from --registry-metrics-port %s does not serve "
                            "/metrics yet (%s); using it anyway", name, port, rule.text, rule_why)
            return port, "rule"
        api_why = probe.metrics(host, reg.port)
        if api_why is None:
            self._say_suspect(key, name, reg.port)
            return reg.port, API_PORT_SOURCES[0]
        if key not in self._warned:
            self._warned.add(key)
            log.warning(
                "registry: %s has no load signal: its registration has no metrics_port, /metrics on its API "
                "port %d gave %s, and %s; nginx balances it by its own connection counts only (start "
                "FastDeploy with --metrics-port and pass --registry-metrics-port)", name, reg.port, api_why,
                f"--registry-metrics-port {rule.text} gives no port for it" if rule else "no --registry-metrics-port",
            )
        return reg.port, "none"

    def _say_suspect(self, key: Key, name: str, port: int) -> None:
        if key in self._suspect_said:
            return
        self._suspect_said.add(key)
        log.warning(
            "registry: %s: its load signal is /metrics on its API port %d, where FastDeploy's load gauges may read "
            "0 (a forked web worker answers there when the instance has no metrics port of its own); start "
            "FastDeploy with --metrics-port and pass --registry-metrics-port (metrics_source api-port-suspect)",
            name, port,
        )
