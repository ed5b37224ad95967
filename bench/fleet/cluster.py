"""The fleet under test, all on 127.0.0.1: simulated replicas (many per `fdngx sim` process), N OpenResty
frontends (real nginx + the Lua module, standalone configs rendered by `fdngx render`), and one controller
(`fdngx sidecar --push-to-file`). Every process runs in its own session and is stopped by its process group
(bench.lb.procs), also on errors and at exit.

Replicas differ so that weights and down flags carry information: slots cycle through 16/32/48/64 (capacity
weights 5/10/15/20) and `unhealthy` replicas answer /health 404 (the controller marks them down).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import requests

from bench.lb import procs
from fdngx.nginx.admin import Admin
from fdngx.nginx.control import find_nginx, prepare_prefix
from fdngx.nginx.openresty import lua_modules
from fdngx.sim.process import SimProcess, free_ports, start_sim

SLOTS = (16, 32, 48, 64)


def slots_of(i: int) -> int:
    return SLOTS[i % len(SLOTS)]


class Replicas:
    """`n` simulated replicas in `sims` processes (replica i in process i % sims)."""

    def __init__(self, n: int, sims: int, workdir: Path, unhealthy: int = 0) -> None:
        self.n = n
        ports = free_ports(2 * n)
        self.api, self.met = ports[:n], ports[n:]
        self.sims: list[SimProcess] = []
        self.inventory = workdir / "fdngx.json"
        self.unhealthy: list[int] = []
        try:
            for k in range(sims):
                idx = list(range(k, n, sims))
                self.sims.append(start_sim([self.api[i] for i in idx], [self.met[i] for i in idx],
                                           max_num_seqs=[slots_of(i) for i in idx], seed=k,
                                           log_path=workdir / f"sim{k}.log", timeout=180))
            # Spread over the processes: replica i lives in sim i % sims at index i // sims.
            step = max(1, n // unhealthy) if unhealthy else 0
            self.unhealthy = [i for i in range(3, n, step)][:unhealthy] if unhealthy else []
            for i in self.unhealthy:
                self.sims[i % sims].fault(i // sims, unhealthy=True)
        except BaseException:
            self.stop()
            raise
        self.write_inventory(range(n))

    def write_inventory(self, members: range | list[int]) -> None:
        instances = [{"name": f"dp{i}", "host": "127.0.0.1", "port": self.api[i], "metrics_port": self.met[i],
                      "engine": "sim", "max_num_seqs": slots_of(i)} for i in members]
        tmp = self.inventory.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": 1, "upstream": "fleet", "instances": instances}, indent=1))
        os.replace(tmp, self.inventory)

    def pgids(self) -> list[int]:
        return [s.pid for s in self.sims]

    def stop(self) -> None:
        for s in self.sims:
            s.stop(grace=2.0)
        self.sims = []


STATIC_CONF = """\
# bench.fleet --static-replicas: every replica's /metrics (a page the simulator rendered) and /health from one
# nginx, so the replicas' own CPU (a real fleet's, on its own hosts) stays off this machine.
worker_processes 2;
worker_rlimit_nofile 20000;
pid logs/nginx.pid;
events {{ worker_connections 8192; }}
http {{
    access_log off;
    keepalive_requests 100000;
    default_type text/plain;
    server {{
{metrics}
        location = /metrics {{ root {pages}; try_files /$server_port.prom =404; }}
        location / {{ return 404; }}
    }}
    server {{
{healthy}
        location = /health {{ return 200 ""; }}
        location / {{ return 404; }}
    }}
    server {{
{sick}
        location / {{ return 404 "Worker Service Not Healthy"; }}
    }}
}}
"""


class StaticReplicas(Replicas):
    """The same inventory, answered by one nginx instead of `fdngx sim` (pages rendered by the simulator's
    own metrics code, slots 16/32/48/64 in turn; the `unhealthy` ones answer /health 404)."""

    def __init__(self, n: int, workdir: Path, unhealthy: int = 0) -> None:
        from fdngx.sim.metrics import ReplicaMetrics
        from fdngx.sim.model import ModelParams, ReplicaModel

        self.n = n
        ports = free_ports(2 * n)
        self.api, self.met = ports[:n], ports[n:]
        self.sims = []
        self.inventory = workdir / "fdngx.json"
        step = max(1, n // unhealthy) if unhealthy else 0
        self.unhealthy = list(range(3, n, step))[:unhealthy] if unhealthy else []
        # nginx's workers run as nobody: the pages live in a directory they can read (removed by stop()).
        self.pages = pages = Path(tempfile.mkdtemp(prefix="fdngx-fleet-pages-"))
        pages.chmod(0o755)
        rendered = {s: ReplicaMetrics(ReplicaModel(ModelParams(max_num_seqs=s))).render() for s in SLOTS}
        for i, port in enumerate(self.met):
            (pages / f"{port}.prom").write_bytes(rendered[slots_of(i)])
            (pages / f"{port}.prom").chmod(0o644)
        sick = set(self.unhealthy)
        listen = "        listen 127.0.0.1:{};\n".format
        conf = workdir / "replicas.conf"
        conf.write_text(STATIC_CONF.format(
            metrics="".join(listen(p) for p in self.met), pages=pages,
            healthy="".join(listen(p) for i, p in enumerate(self.api) if i not in sick) or listen(free_ports(1)[0]),
            sick="".join(listen(p) for i, p in enumerate(self.api) if i in sick) or listen(free_ports(1)[0])))
        prepare_prefix(workdir)
        self.proc = procs.spawn([find_nginx(), "-p", f"{workdir}/", "-c", str(conf), "-e", "logs/error.log", "-g",
                                 "daemon off;"], workdir / "replicas.out")
        try:
            procs.wait_http(f"http://127.0.0.1:{self.met[-1]}/metrics", 30, self.proc)
        except BaseException:
            self.stop()
            raise
        self.write_inventory(range(n))

    def pgids(self) -> list[int]:
        return [self.proc.pid]

    def stop(self) -> None:
        if getattr(self, "proc", None) is not None:
            procs.stop_group(self.proc)
        shutil.rmtree(self.pages, ignore_errors=True)


class Frontends:
    """`count` standalone OpenResty frontends rendered from the inventory, sharing one admin token."""

    def __init__(self, count: int, replicas: Replicas, workdir: Path, token_file: Path,
                 render_args: tuple[str, ...] = ()) -> None:
        if not lua_modules(None):
            raise SystemExit("bench.fleet needs nginx with the Lua module (make nginx)")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.admins: list[Admin] = []
        self.urls: list[str] = []
        self.site_urls: list[str] = []
        self.dirs: list[Path] = []
        binary = find_nginx()
        try:
            for j in range(count):
                d = workdir / f"fe{j}"
                d.mkdir(parents=True, exist_ok=True)
                port, admin_port = free_ports(2)
                conf = d / "nginx.conf"
                argv = [sys.executable, "-m", "fdngx", "render", "-i", str(replicas.inventory), "--mode",
                        "standalone", "--flavor", "openresty", "--listen", f"127.0.0.1:{port}", "--admin-listen",
                        f"127.0.0.1:{admin_port}", "--admin-token-file", str(token_file), "--access-log", "off",
                        "--out", str(conf), *render_args]
                run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
                if run.returncode != 0:
                    raise RuntimeError(f"fdngx render for frontend {j}: {run.stderr.strip()}")
                prepare_prefix(d)
                proc = procs.spawn([binary, "-p", f"{d}/", "-c", str(conf), "-e", "logs/error.log", "-g",
                                    "daemon off;"], d / "nginx.out")
                self.procs.append(proc)
                procs.wait_http(f"http://127.0.0.1:{port}/health", 30, proc, ok=200)
                admin = Admin.from_url(f"http://127.0.0.1:{admin_port}", token_file.read_text().strip(), timeout=10)
                self.admins.append(admin)
                self.urls.append(admin.url)
                self.site_urls.append(f"http://127.0.0.1:{port}")
                self.dirs.append(d)
        except BaseException:
            self.stop()
            raise

    def pids(self) -> list[set[int]]:
        """Each frontend's master and worker pids (a reload replaces the workers)."""
        from fdngx.system.procs import children

        return [{p.pid, *children(p.pid)} for p in self.procs]

    def pgids(self) -> list[int]:
        return [p.pid for p in self.procs]

    def views(self) -> list[tuple[dict[str, str], dict[str, dict[str, str]]]]:
        return [a.view() for a in self.admins]

    def stop(self) -> None:
        for p in reversed(self.procs):
            procs.stop_group(p)
        for a in self.admins:
            a.close()
        self.procs, self.admins = [], []


def make_token(path: Path) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(24) + "\n")
    return path


class Controller:
    """`fdngx sidecar` in controller mode, debug logs as JSON lines (one per cycle: what bench.fleet reads)."""

    def __init__(self, replicas: Replicas, urls: list[str], workdir: Path, token_file: Path,
                 interval: float = 2.0, extra: tuple[str, ...] = (), name: str = "controller") -> None:
        self.push_file = workdir / f"{name}.frontends"
        self.write_frontends(urls)
        self.metrics_port = free_ports(1)[0]
        self.log = workdir / f"{name}.log"
        argv = [sys.executable, "-m", "fdngx", "--verbose", "--log-format", "json", "sidecar",
                "-i", str(replicas.inventory), "--flavor", "openresty", "--push-to-file", str(self.push_file),
                "--push-token-file", str(token_file), "--interval", str(interval),
                "--metrics-listen", f"127.0.0.1:{self.metrics_port}", "--state", str(workdir / f"{name}.state"),
                *extra]
        self.proc = procs.spawn(argv, self.log)
        procs.wait_http(f"http://127.0.0.1:{self.metrics_port}/metrics", 60, self.proc)

    def write_frontends(self, urls: list[str]) -> None:
        tmp = self.push_file.with_suffix(".tmp")
        tmp.write_text("".join(f"{u}\n" for u in urls))
        os.replace(tmp, self.push_file)

    def cycles(self) -> list[dict[str, object]]:
        """Every cycle record logged so far."""
        out = []
        with self.log.open("rb") as fh:
            for raw in fh:
                if b'"cycle"' not in raw:
                    continue
                try:
                    rec = json.loads(raw)
                except ValueError:
                    continue
                if "scrape_policy_s" in rec:
                    out.append(rec)
        return out

    def wait_cycles(self, count: int, timeout: float) -> list[dict[str, object]]:
        deadline = time.monotonic() + timeout
        while True:
            got = self.cycles()
            if len(got) >= count:
                return got
            if self.proc.poll() is not None:
                raise RuntimeError(f"controller exited {self.proc.returncode}: {procs_tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"controller made {len(got)} of {count} cycles in {timeout:.0f} s")
            time.sleep(0.2)

    def metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5).text

    def stop(self) -> None:
        procs.stop_group(self.proc, grace=5.0)


def procs_tail(path: Path, lines: int = 5) -> str:
    try:
        return " | ".join(path.read_text(errors="replace").strip().splitlines()[-lines:])
    except OSError:
        return "(no log)"
