"""The frontends under test. Each: start(cluster, workdir, count) -> base URLs (one per instance), stop().

Adding one = a small class and a line in FRONTENDS. `count` > 1 is the two-frontends scenario: that many
independent instances (own processes, own state), the load generator splits traffic between them.
"""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import requests
from prometheus_client.parser import text_string_to_metric_families

from bench.lb import procs
from bench.lb.cluster import Cluster
from fdngx.nginx.control import find_nginx, prepare_prefix
from fdngx.sim.process import free_ports


class Frontend:
    name = "base"
    oracle = False  # the load generator routes by itself
    extra_warmup = 0.0  # seconds of warm-up on top of the common one (control loops need to converge)

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, cluster: Cluster, workdir: Path, count: int) -> list[str]:
        raise NotImplementedError

    def reloads(self) -> int | None:
        """Config reloads so far (summed over instances); None when the frontend has no such thing."""
        return None

    def pgids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def stop(self) -> None:
        for p in reversed(self.procs):
            procs.stop_group(p)
        self.procs = []


class Oracle(Frontend):
    """Join-the-shortest-queue in the load generator on exact in-flight counts per slot (loadgen.py)."""

    name = "oracle"
    oracle = True

    def start(self, cluster: Cluster, workdir: Path, count: int) -> list[str]:
        return []


HAND_CONF = """\
# What a sysadmin writes by hand: SSE-safe proxying, keepalive, nginx's default retries (error timeout).
worker_processes auto;
pid logs/nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    upstream llm {{
{balance}
{servers}
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{port};
        client_max_body_size 64m;
        location /v1/ {{
            proxy_pass http://llm;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_cache off;
            proxy_read_timeout 1h;
        }}
        location = /health {{ return 200 "ok"; }}
    }}
}}
"""


def start_nginx(prefix: Path, port: int) -> subprocess.Popen[bytes]:
    prepare_prefix(prefix)
    argv = [find_nginx(), "-p", f"{prefix}/", "-c", str(prefix / "nginx.conf"), "-e", "logs/error.log",
            "-g", "daemon off;"]
    proc = procs.spawn(argv, prefix / "logs" / "stdout.log")
    procs.wait_http(f"http://127.0.0.1:{port}/health", 20, proc)
    return proc


class HandNginx(Frontend):
    def __init__(self, name: str, balance: str, zone: bool) -> None:
        super().__init__()
        self.name = name
        self.balance = balance
        self.zone = zone

    def start(self, cluster: Cluster, workdir: Path, count: int) -> list[str]:
        urls = []
        for k, port in enumerate(free_ports(count)):
            prefix = workdir / f"{self.name}-{k}"
            prefix.mkdir(parents=True, exist_ok=True)
            lines = ["        zone llm 256k;"] if self.zone else []
            if self.balance:
                lines.append(f"        {self.balance};")
            servers = "\n".join(f"        server 127.0.0.1:{p};" for p in cluster.ports)
            (prefix / "nginx.conf").write_text(HAND_CONF.format(balance="\n".join(lines), servers=servers, port=port))
            self.procs.append(start_nginx(prefix, port))
            urls.append(f"http://127.0.0.1:{port}")
        return urls


def fdngx_cli(*args: str, log: Path) -> None:
    out = subprocess.run([sys.executable, "-m", "fdngx", *args], capture_output=True, text=True, timeout=60)
    log.write_text(out.stdout + out.stderr)
    if out.returncode != 0:
        raise RuntimeError(f"fdngx {' '.join(args[:2])} exited {out.returncode}: {out.stderr.strip()[-500:]}")


def metric_value(url: str, name: str) -> float:
    """Sum of a sample's values in a Prometheus text page (0 when absent)."""
    text = requests.get(url, timeout=2).text
    total = 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name:
                total += s.value
    return total


class FdngxNginx(Frontend):
    """fdngx render --mode standalone (+ optionally the sidecar loop on it).

    render_args/sidecar_args carry a flavor's options (e.g. --flavor openresty); `sidecar` False is the
    static flavor: capacity weights from the inventory, rendered once.
    """

    def __init__(self, name: str, *, sidecar: bool, render_args: tuple[str, ...] = (),
                 sidecar_args: tuple[str, ...] = (), extra_warmup: float = 0.0) -> None:
        super().__init__()
        self.name = name
        self.sidecar = sidecar
        self.render_args = render_args
        self.sidecar_args = sidecar_args
        self.extra_warmup = extra_warmup
        self.metrics_urls: list[str] = []

    def start(self, cluster: Cluster, workdir: Path, count: int) -> list[str]:
        urls = []
        for k in range(count):
            port, mport, aport = free_ports(3)
            prefix = workdir / f"{self.name}-{k}"
            inv = cluster.inventory(prefix / "fdngx.json", capacity_weights=not self.sidecar)
            conf = prefix / "nginx.conf"
            common = ["-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{port}", "--out", str(conf),
                      *[a.replace("{admin_port}", str(aport)) for a in self.render_args]]
            fdngx_cli("render", *common, "--access-log", "off", log=prefix / "render.log")
            self.procs.append(start_nginx(prefix, port))
            if self.sidecar:
                argv = [sys.executable, "-m", "fdngx", "sidecar", *common, "--access-log", "off",
                        "--metrics-listen", f"127.0.0.1:{mport}",
                        *[a.replace("{admin_port}", str(aport)) for a in self.sidecar_args]]
                proc = procs.spawn(argv, prefix / "sidecar.log")
                self.procs.append(proc)
                murl = f"http://127.0.0.1:{mport}/metrics"
                procs.wait_http(murl, 30, proc)
                self.metrics_urls.append(murl)
            urls.append(f"http://127.0.0.1:{port}")
        return urls

    def reloads(self) -> int | None:
        if not self.sidecar:
            return 0
        total = 0
        for url in self.metrics_urls:
            try:
                total += int(metric_value(url, "fdngx_reloads_total"))
            except (requests.RequestException, ValueError):
                return None
        return total


class FdngxController(Frontend):
    """The recommended configuration for several frontends (docs/controller.md): `count` OpenResty frontends
    rendered once, and ONE sidecar in controller mode that scrapes once per cycle and pushes the same snapshot
    (one generation) to all of them. fdngx-recommended runs this when there are several frontends;
    fdngx-recommended-per-frontend runs a sidecar per frontend instead."""

    name = "fdngx-controller"
    extra_warmup = 5.0

    def __init__(self, name: str = "fdngx-controller", render_args: tuple[str, ...] = (),
                 interval: str = "1") -> None:
        super().__init__()
        self.name = name
        self.metrics_url = ""
        self.render_args = render_args
        self.interval = interval

    def start(self, cluster: Cluster, workdir: Path, count: int) -> list[str]:
        workdir.mkdir(parents=True, exist_ok=True)
        token = workdir / f"{self.name}.token"
        fd = os.open(token, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(24) + "\n")
        inv = cluster.inventory(workdir / f"{self.name}.json", capacity_weights=False)
        urls, admins = [], []
        for k in range(count):
            port, aport = free_ports(2)
            prefix = workdir / f"{self.name}-{k}"
            prefix.mkdir(parents=True, exist_ok=True)
            fdngx_cli("render", "-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{port}",
                      "--out", str(prefix / "nginx.conf"), "--flavor", "openresty", "--admin-listen",
                      f"127.0.0.1:{aport}", "--admin-token-file", str(token), "--access-log", "off",
                      *self.render_args, log=prefix / "render.log")
            self.procs.append(start_nginx(prefix, port))
            urls.append(f"http://127.0.0.1:{port}")
            admins.append(f"http://127.0.0.1:{aport}")
        push_file = workdir / f"{self.name}.frontends"
        push_file.write_text("".join(f"{a}\n" for a in admins))
        mport = free_ports(1)[0]
        argv = [sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--flavor", "openresty",
                "--push-to-file", str(push_file), "--push-token-file", str(token), "--interval", self.interval,
                "--metrics-listen", f"127.0.0.1:{mport}", "--state", str(workdir / f"{self.name}.state")]
        proc = procs.spawn(argv, workdir / f"{self.name}.sidecar.log")
        self.procs.append(proc)
        self.metrics_url = f"http://127.0.0.1:{mport}/metrics"
        procs.wait_http(self.metrics_url, 30, proc)
        return urls

    def reloads(self) -> int | None:
        try:
            return int(metric_value(self.metrics_url, "fdngx_reloads_total"))
        except (requests.RequestException, ValueError):
            return None


def per_frontend_recommended(name: str) -> FdngxNginx:
    """The OpenResty flavor with its own sidecar on every frontend (the small set-up: one frontend)."""
    return FdngxNginx(name, sidecar=True, render_args=OPENRESTY, sidecar_args=("--interval", "1"), extra_warmup=5.0)


class FdngxRecommended(Frontend):
    """The recommended configuration as the README and `fdngx --help` name it: the OpenResty flavor with one
    sidecar; with several frontends that one sidecar runs in controller mode and pushes to all of them."""

    name = "fdngx-recommended"

    def __init__(self) -> None:
        super().__init__()
        self.inner: Frontend | None = None

    def start(self, cluster: Cluster, workdir: Path, count: int) -> list[str]:
        self.inner = FdngxController(self.name) if count > 1 else per_frontend_recommended(self.name)
        self.extra_warmup = self.inner.extra_warmup
        return self.inner.start(cluster, workdir, count)

    def reloads(self) -> int | None:
        return self.inner.reloads() if self.inner else None

    def pgids(self) -> list[int]:
        return self.inner.pgids() if self.inner else []

    def stop(self) -> None:
        if self.inner:
            self.inner.stop()


class SglangGateway(Frontend):
    """SGLang Model Gateway (PyPI sglang-router) with one policy; no hub access (see README)."""

    def __init__(self, policy: str) -> None:
        super().__init__()
        self.policy = policy
        self.name = f"sglang-{ {'round_robin': 'rr', 'power_of_two': 'p2', 'cache_aware': 'ca'}[policy] }"

    def start(self, cluster: Cluster, workdir: Path, count: int) -> list[str]:
        env = dict(os.environ, HF_ENDPOINT="http://127.0.0.1:9", HF_HUB_OFFLINE="1", NO_PROXY="*",
                   no_proxy="*")
        urls = []
        for k in range(count):
            port, pport = free_ports(2)
            d = workdir / f"{self.name}-{k}"
            d.mkdir(parents=True, exist_ok=True)
            argv = [sys.executable, "-m", "sglang_router.launch_router", "--host", "127.0.0.1", "--port", str(port),
                    "--worker-urls", *[cluster.url(i) for i in range(cluster.n)], "--policy", self.policy,
                    "--log-level", "warn", "--prometheus-host", "127.0.0.1", "--prometheus-port", str(pport)]
            proc = procs.spawn(argv, d / "gateway.log", env=env)
            self.procs.append(proc)
            procs.wait_http(f"http://127.0.0.1:{port}/v1/models", 60, proc)
            urls.append(f"http://127.0.0.1:{port}")
        return urls

    def stop(self) -> None:
        for p in self.procs:
            procs.stop_group(p, grace=2.0)
        self.procs = []


OPENRESTY = ("--flavor", "openresty", "--admin-listen", "127.0.0.1:{admin_port}")

FRONTENDS: dict[str, Callable[[], Frontend]] = {
    "oracle": Oracle,
    "nginx-rr": lambda: HandNginx("nginx-rr", "", zone=False),
    "nginx-lc": lambda: HandNginx("nginx-lc", "least_conn", zone=True),
    # The same config again, side by side: how far two cells differ when nothing differs (the noise floor of
    # every ratio target; the report shows twin / nginx-lc). Not in the default grid.
    "nginx-lc-twin": lambda: HandNginx("nginx-lc-twin", "least_conn", zone=True),
    "fdngx-static": lambda: FdngxNginx("fdngx-static", sidecar=False),
    # The two configurations a user runs, named for what they are, with the sidecar's default settings
    # but the interval: 1 s, since the simulator runs ~1.7x faster than a real engine (workload.py).
    # fdngx-default: `fdngx render`'s default output (upstream with least_conn and weights) kept by the sidecar
    # with reloads. 20 s extra warm-up: the first load corrections and their reloads are done by then.
    "fdngx-default": lambda: FdngxNginx("fdngx-default", sidecar=True, sidecar_args=("--interval", "1"),
                                        extra_warmup=20.0),
    # fdngx-recommended: the OpenResty flavor (the Lua balancer, pushes, no reloads) with one sidecar: in
    # controller mode, pushing to every frontend, when there are several (docs/controller.md).
    "fdngx-recommended": FdngxRecommended,
    # The OpenResty flavor with a sidecar per frontend, in the several-frontends scenarios too (what
    # fdngx-recommended was before 2026-12-05; not in the default grid).
    "fdngx-recommended-per-frontend": lambda: per_frontend_recommended("fdngx-recommended-per-frontend"),
    # The recommended configuration without the decode speed factor in its weights (--no-speed-aware): what
    # the factor costs or buys, side by side (the half-speed scenarios). Not in the default grid.
    "fdngx-recommended-nospeed": lambda: FdngxNginx("fdngx-recommended-nospeed", sidecar=True, render_args=OPENRESTY,
                                                    sidecar_args=("--interval", "1", "--no-speed-aware"),
                                                    extra_warmup=5.0),
    # The OpenResty flavor with one controller-mode sidecar for all frontends, in one-frontend scenarios too
    # (not in the default grid).
    "fdngx-controller": FdngxController,
    # The controller layout with the balancer's p2c pick (two weight-drawn replicas, the less loaded wins) and
    # with a 0.5 s push interval: tried against herding of several frontends on one snapshot, and neither helps
    # (docs/benchmarks.md, "Several frontends at 5 repeats"; not in the grid).
    "fdngx-controller-p2c": lambda: FdngxController("fdngx-controller-p2c", render_args=("--balancer", "p2c")),
    "fdngx-controller-fast": lambda: FdngxController("fdngx-controller-fast", interval="0.5"),
    "sglang-rr": lambda: SglangGateway("round_robin"),
    "sglang-p2": lambda: SglangGateway("power_of_two"),
    "sglang-ca": lambda: SglangGateway("cache_aware"),
}
