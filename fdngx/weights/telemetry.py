"""The sidecar's own Prometheus metrics (served on --metrics-listen, default 127.0.0.1:18400).

A private registry, so importing fdngx never adds series to anyone else's default registry, and the
per-replica series of a replica that left the inventory are removed instead of freezing at old values.
The per-replica label is `replica` (Prometheus owns `instance`: it would be renamed exported_instance);
labelled counters are created at 0 when a replica appears, so rate() works from the first scrape; no
`_created` series. The default port is outside the exporter range 9100-9999 (9400 is dcgm-exporter's,
which runs on most GPU hosts).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics

from fdngx import __version__
from fdngx.domain import Listen, LoadSample
from fdngx.errors import UsageError, listen_error
from fdngx.nginx.fanout import PushOutcome
from fdngx.weights import exporter
from fdngx.weights.controller import CycleResult
from fdngx.weights.state import InstanceState, PolicyState

DEFAULT_LISTEN = "127.0.0.1:18400"
disable_created_metrics()


class Telemetry:
    def __init__(self, registry: CollectorRegistry | None = None, flavor: str = "nginx") -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        lbl = ["replica"]
        self.build = Gauge("fdngx_build_info", "fdngx version (value 1)", ["version", "flavor"], registry=r)
        self.build.labels(__version__, flavor).set(1)
        self.up = Gauge("fdngx_replica_up", "1 when nginx has the replica in rotation, 0 when it holds it out",
                        lbl, registry=r)
        self.drained = Gauge("fdngx_replica_drained", "1 while nginx holds the replica out for maintenance (fdngx "
                             "drain): held out on purpose, not for its health", lbl, registry=r)
        self.backup = Gauge("fdngx_replica_backup", "1 while traffic from elsewhere fills the replica and nginx "
                            "sends it none of its own (nginx `backup`)", lbl, registry=r)
        self.weight = Gauge("fdngx_replica_weight", "Weight nginx has (config or Lua balancer): the last one applied",
                            lbl, registry=r)
        self.running = Gauge("fdngx_replica_running", "Requests running, this cycle's scrape (NaN: no usable load)",
                             lbl, registry=r)
        self.queued = Gauge("fdngx_replica_queued", "Requests queued/waiting, this cycle's scrape (NaN: no usable "
                            "load)", lbl, registry=r)
        self.speed = Gauge(
            "fdngx_replica_speed_ratio", "Decode speed factor in the weight (1: near the fleet's median)", lbl,
            registry=r,
        )
        self.kv = Gauge("fdngx_replica_kv_usage_ratio", "KV-cache usage 0..1, this cycle's scrape (NaN: no usable "
                        "load, or not reported)", lbl, registry=r)
        self.age = Gauge(
            "fdngx_replica_scrape_age_seconds", "Seconds since the last usable metrics scrape", lbl, registry=r
        )
        self.signal = Gauge(
            "fdngx_replica_load_signal", "1 when the last scrape gave a usable load signal, 0 when not", lbl,
            registry=r,
        )
        self.healthy = Gauge(
            "fdngx_replica_healthy", "1 when the replica's last /health check answered 200, 0 when not, whatever "
            "nginx holds (NaN: not checked this cycle)", lbl, registry=r,
        )
        self.slots = Gauge("fdngx_replica_slots", "Capacity the policy uses (max_batch_size, else max_num_seqs)",
                           lbl, registry=r)
        self.load = Gauge("fdngx_replica_load_ratio", "Smoothed load per slot the policy uses ((running + queued) "
                          "/ slots, plus KV pressure)", lbl, registry=r)
        self.scrape_errors = Counter(
            "fdngx_replica_scrape_errors_total", "Scrapes whose metrics could not be used", lbl, registry=r
        )
        self.reloads = Counter("fdngx_reloads_total", "nginx reloads fdngx made (confirmed)", registry=r)
        self.apply_failures = Counter(
            "fdngx_apply_failures_total", "Applies (write + test + reload, or openresty push) that failed", registry=r
        )
        self.pushes = Counter("fdngx_pushes_total", "openresty flavor: weight/load pushes to the balancer", registry=r)
        self.nginx_up = Gauge(
            "fdngx_nginx_up", "1 when the nginx fdngx reloads is running, 0 when not (checked every cycle; NaN "
            "when fdngx does not reload nginx, e.g. --no-reload)", registry=r
        )
        self.nginx_up.set(math.nan)
        self.last_success = Gauge(
            "fdngx_last_apply_success_timestamp_seconds",
            "Last cycle at whose end nginx had what fdngx decided (applied, pushed, or already current), Unix time",
            registry=r,
        )
        self.budget_held = Gauge(
            "fdngx_budget_held", "1 while the reload budget holds weight changes back", registry=r
        )
        self.inventory_held = Gauge(
            "fdngx_inventory_held", "1 while an inventory change in which a replica leaves waits for a reload slot "
            "(nginx flavor: membership is paced like weights, --max-reloads-per-minute)", registry=r
        )
        self.apply_seconds = Histogram(
            "fdngx_apply_duration_seconds", "Write + nginx -t + reload + confirm, or a push",
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30), registry=r,
        )
        self.cycle_seconds = Histogram(
            "fdngx_cycle_duration_seconds", "One scrape + policy (+ apply) cycle",
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )
        self.fail_open = Gauge(
            "fdngx_fail_open", "1 while the policy fails open to static weights: every replica in service fails "
            "/health (fdngx_replica_healthy 0 on each), or none has fresh metrics", registry=r,
        )
        self.generation = Gauge(
            "fdngx_config_generation", "Generation of the config last applied, as a number (its 12 hex digits)",
            registry=r,
        )
        fl = ["frontend"]
        self.push_failures = Counter(
            "fdngx_push_failures_total", "Controller mode: pushes to a frontend that failed (refused, timed out, "
            "HTTP error)", fl, registry=r,
        )
        self.push_stale = Counter(
            "fdngx_push_stale_total", "Controller mode: pushes a frontend refused as older (409: another "
            "controller's newer snapshot is in force there)", fl, registry=r,
        )
        self.push_seconds = Histogram(
            "fdngx_push_duration_seconds", "Controller mode: one push to a frontend (POST + validate + install)",
            fl, buckets=(0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5), registry=r,
        )
        self.frontend_up = Gauge(
            "fdngx_frontend_up", "Controller mode: 1 when the frontend answered the last push (took it, or holds "
            "a newer one), 0 when not", fl, registry=r,
        )
        self._known: set[str] = set()
        self._frontends: set[str] = set()
        self._server: Any = None
        self._lock = threading.Lock()

    def cycle(self, result: CycleResult, state: PolicyState, now: float, seconds: float) -> None:
        """Record one controller cycle."""
        with self._lock:
            self.cycle_seconds.observe(seconds)
            self._apply(result, now)
            # No outcome because there is no frontend left: the per-frontend series of the old ones go too
            # (a cycle that failed before its push keeps them: it says nothing about the frontends).
            if result.pushes is not None:
                self._pushes(result.pushes)
            if result.decisions is not None:
                self._replicas(result, state, now)

    def _apply(self, result: CycleResult, now: float) -> None:
        applied = result.applied
        if result.nginx_running is not None:
            self.nginx_up.set(1 if result.nginx_running else 0)
        if result.error is not None:
            self.apply_failures.inc()
        elif result.nginx_running is not False:
            self.last_success.set(now)
        if result.pushed is not None:
            self.pushes.inc()
        if applied is not None:
            if applied.reloaded:
                self.reloads.inc()
                self.apply_seconds.observe(applied.reload_seconds)
            if applied.generation:
                self.generation.set(int(applied.generation, 16))

    def _pushes(self, pushes: tuple[PushOutcome, ...]) -> None:
        names = {o.frontend for o in pushes}
        for gone in self._frontends - names:
            for metric in (self.push_failures, self.push_stale, self.push_seconds, self.frontend_up):
                with contextlib.suppress(KeyError):
                    metric.remove(gone)
        for new in names - self._frontends:
            self.push_failures.labels(new)  # created at 0
            self.push_stale.labels(new)
        self._frontends = names
        for o in pushes:
            if o.status == "busy":
                continue  # no push was made: the last one still hangs (it counted as failed already)
            self.frontend_up.labels(o.frontend).set(1 if o.answered else 0)
            if o.status == "stale":
                self.push_stale.labels(o.frontend).inc()
            elif not o.accepted:
                self.push_failures.labels(o.frontend).inc()
            if o.answered:
                self.push_seconds.labels(o.frontend).observe(o.seconds)

    def _replicas(self, result: CycleResult, state: PolicyState, now: float) -> None:
        decisions = result.decisions
        assert decisions is not None
        names = {d.name for d in decisions}
        for gone in self._known - names:
            self._forget(gone)
        for new in names - self._known:
            self.scrape_errors.labels(new)  # created at 0
        self._known = names
        self.fail_open.set(1 if decisions.fail_open else 0)
        self.budget_held.set(1 if any(d.budget_held for d in decisions) else 0)
        samples: Mapping[str, LoadSample] = result.samples
        for d in decisions:
            st = state.instances.get(d.name)
            self._applied(d.name, st)
            self.speed.labels(d.name).set(d.speed)
            s = samples.get(d.name)
            self.signal.labels(d.name).set(1 if d.load_signal else 0)
            # What the sidecar saw, apart from what nginx holds: when every replica fails, the policy fails open
            # and nginx has them all in rotation (up 1); this says they fail (the rules' FdngxFleetDown).
            self.healthy.labels(d.name).set(math.nan if s is None else 1 if s.healthy else 0)
            if s is not None and s.ok and d.load_signal:
                self.running.labels(d.name).set(s.running)
                self.queued.labels(d.name).set(s.queued)
                self.kv.labels(d.name).set(s.kv_usage if s.kv_usage is not None else math.nan)
            else:
                # Not known now: NaN, not the last reading frozen (a dead replica's requests are not running;
                # the rules sum only replicas with a load signal).
                for gauge in (self.running, self.queued, self.kv):
                    gauge.labels(d.name).set(math.nan)
                self.scrape_errors.labels(d.name).inc()
            if st is not None and st.capacity is not None:
                self.slots.labels(d.name).set(st.capacity)
            if d.load is not None:
                self.load.labels(d.name).set(d.load)
            last = st.last_ok_at if st else None
            self.age.labels(d.name).set(now - last if last is not None else math.inf)

    def _applied(self, name: str, st: InstanceState | None) -> None:
        """up/drained/backup/weight as nginx has them: from the state, which records only what nginx got (a
        failed apply or push keeps the previous values there), not from this cycle's decision. A replica nginx
        never got from fdngx (weight None: every apply since it appeared failed) has none of the four: what
        nginx holds for it is not known."""
        if st is None or st.weight is None:
            for metric in (self.up, self.drained, self.backup, self.weight):
                with contextlib.suppress(KeyError):
                    metric.remove(name)
            return
        self.up.labels(name).set(0 if st.down else 1)
        self.drained.labels(name).set(1 if st.drained else 0)
        self.backup.labels(name).set(1 if st.backup else 0)
        self.weight.labels(name).set(st.weight)

    def _forget(self, name: str) -> None:
        per_replica = (self.up, self.drained, self.backup, self.weight, self.speed, self.running, self.queued,
                       self.kv, self.age, self.signal, self.healthy, self.slots, self.load, self.scrape_errors)
        for metric in per_replica:
            with contextlib.suppress(KeyError):
                metric.remove(name)

    def serve(self, listen: str) -> tuple[str, int]:
        """Serve /metrics on ADDR:PORT in a daemon thread (bounded: fdngx.weights.exporter); returns the bound
        address."""
        try:
            where = Listen.parse(listen, "--metrics-listen", allow_zero=True)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        try:
            server, _thread = exporter.serve(where.bind_host, where.port, self.registry)
        except OSError as exc:  # the machine's state (taken, an address not up yet), not a usage error: exit 1
            raise listen_error("--metrics-listen", listen, exc) from None
        self._server = server
        return where.bind_host, server.server_port

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

