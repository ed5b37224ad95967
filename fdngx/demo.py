"""`fdngx demo`: the whole loop on this machine, with the same commands a sysadmin would type.

launch (4 simulated replicas, one at half speed) -> render (standalone nginx.conf) -> nginx -> sidecar,
with a steady streaming load through nginx and a status table every few seconds. Ctrl-C (or
--duration) stops everything it started, by PID.
"""

from __future__ import annotations

import collections
import contextlib
import json
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import requests

from fdngx.errors import LaunchError
from fdngx.nginx.control import find_nginx
from fdngx.system.procs import stop_popen_group


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def free_run(start: int, n: int, avoid: set[int] = frozenset()) -> int:  # type: ignore[assignment]
    """First port p >= start such that p..p+n-1 are all free (and not in `avoid`)."""
    for base in range(start, 65535 - n):
        ports = range(base, base + n)
        if not avoid.intersection(ports) and all(_port_free(p) for p in ports):
            return base
    raise LaunchError(f"no {n} consecutive free ports from {start}")


@dataclass
class DemoConfig:
    workdir: Path
    listen_port: int = 8080
    replicas: int = 4
    speeds: str = "1,1,1,0.5"
    max_num_seqs: int = 8
    concurrency: int = 20
    direct: int = 6  # streams that bypass nginx and hit the third replica, like another client would
    interval: float = 2.0
    duration: float | None = None
    status_every: float = 8.0
    echo: Callable[[str], None] = print


@dataclass
class Traffic:
    """A steady streaming load through nginx, counting which replica served each request."""

    url: str
    concurrency: int
    served: collections.Counter[str] = field(default_factory=collections.Counter)
    errors: collections.Counter[str] = field(default_factory=collections.Counter)
    stop: threading.Event = field(default_factory=threading.Event)
    threads: list[threading.Thread] = field(default_factory=list)
    retried: int = 0

    def start(self) -> None:
        for i in range(self.concurrency):
            t = threading.Thread(target=self._loop, args=(random.Random(i),), daemon=True)
            t.start()
            self.threads.append(t)

    def _loop(self, rnd: random.Random) -> None:
        session = requests.Session()
        while not self.stop.is_set():
            body = {"model": "demo", "stream": True, "max_tokens": rnd.choice((16, 32, 64, 128)),
                    "messages": [{"role": "user", "content": "x" * rnd.choice((40, 400, 2000))}]}
            # Like the openai client, retry once when a kept-alive connection was closed under us (nginx's
            # old workers close idle ones at a reload) before any answer arrived; count it.
            for attempt in (1, 2):
                try:
                    with session.post(f"{self.url}/v1/chat/completions", json=body, stream=True, timeout=60) as r:
                        for _ in r.iter_lines():
                            if self.stop.is_set():
                                break
                        ok = r.status_code == 200
                        key = r.headers.get("X-Fdngx-Replica", "?") if ok else f"HTTP {r.status_code}"
                        (self.served if ok else self.errors)[key] += 1
                    break
                except requests.ConnectionError as exc:
                    if attempt == 1:
                        self.retried += 1
                        continue
                    self.errors[type(exc).__name__] += 1
                    self.stop.wait(0.5)
                except requests.RequestException as exc:
                    self.errors[type(exc).__name__] += 1
                    self.stop.wait(0.5)
                    break

    def close(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=5)


def _fdngx(*args: str) -> list[str]:
    return [sys.executable, "-m", "fdngx", *args]


def _run(argv: list[str], echo: Callable[[str], None]) -> str:
    echo(f"$ {shlex.join(['fdngx', *argv[3:]] if argv[:3] == _fdngx() else argv)}")
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        raise LaunchError(f"{shlex.join(argv[2:])} failed: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout + proc.stderr


def run_demo(cfg: DemoConfig) -> dict[str, int]:
    """Run until Ctrl-C or cfg.duration; returns requests served per replica (tests check it)."""
    echo = cfg.echo
    work = cfg.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    inv = work / "fdngx.json"
    conf = work / "nginx" / "nginx.conf"
    listen = cfg.listen_port if _port_free(cfg.listen_port) else free_run(18080, 1)
    api = free_run(8001, cfg.replicas, {listen})
    metrics = free_run(9001, cfg.replicas, {listen, *range(api, api + cfg.replicas)})
    sidecar_metrics = free_run(9400, 1, {listen, *range(api, api + cfg.replicas), *range(metrics, metrics + 4)})
    url = f"http://127.0.0.1:{listen}"
    nginx_proc = sidecar = None
    traffic: Traffic | None = None
    bypass: Traffic | None = None
    launched = False
    echo(f"fdngx demo: working directory {work}")
    try:
        echo("\n== 1. launch: simulated FastDeploy replicas (replica 4 runs at half speed)")
        _run(_fdngx("launch", "--engine", "sim", "--num-servers", str(cfg.replicas), "--base-port", str(api),
                    "--metrics-base-port", str(metrics), "--inventory", str(inv), "--detach", "--",
                    "--max-num-seqs", str(cfg.max_num_seqs), "--speed", cfg.speeds), echo)
        launched = True
        echo(f"   inventory {inv}: " + ", ".join(
            f"{i['name']}={i['port']}" for i in json.loads(inv.read_text())["instances"]))

        echo("\n== 2. render: a standalone nginx.conf (upstream with least_conn + zone, SSE-ready /v1/)")
        _run(_fdngx("render", "-i", str(inv), "--mode", "standalone", "--listen", f"127.0.0.1:{listen}",
                    "--out", str(conf)), echo)

        echo("\n== 3. nginx: the real binary, unprivileged, under the demo prefix")
        argv = [find_nginx(), "-p", f"{conf.parent}/", "-c", str(conf), "-e", "logs/error.log", "-g", "daemon off;"]
        echo(f"$ {shlex.join(argv)}")
        nginx_proc = subprocess.Popen(argv, start_new_session=True)
        _wait_http(f"{url}/health", 20)

        echo("\n== 4. sidecar: scrape /metrics every interval, weights follow real load, safe reloads\n"
             "   (--speed-aware, off by default with plain nginx, so the half-speed replica's weight shows it)")
        side_argv = _fdngx("sidecar", "-i", str(inv), "--out", str(conf), "--mode", "standalone",
                           "--listen", f"127.0.0.1:{listen}", "--interval", str(cfg.interval),
                           "--metrics-listen", f"127.0.0.1:{sidecar_metrics}", "--speed-aware")
        echo(f"$ {shlex.join(['fdngx', *side_argv[3:]])}")
        sidecar = subprocess.Popen(side_argv, start_new_session=True)

        traffic = Traffic(url, cfg.concurrency)
        traffic.start()
        direct_port = api + min(2, cfg.replicas - 1)
        bypass = Traffic(f"http://127.0.0.1:{direct_port}", cfg.direct)
        bypass.start()
        echo(f"\n== 5. traffic: {cfg.concurrency} concurrent streaming chat completions through nginx, and "
             f"{cfg.direct} more\n   sent straight to port {direct_port} by 'another client' nginx cannot see: "
             "the sidecar lowers that replica's weight,\n"
             "   or makes it nginx's backup while that traffic fills it. The half-speed replica's weight drops to\n"
             "   about half once its time per output token is measured (fdngx status says 'decodes at 0.5x').\n")
        echo(f"Point curl or an OpenAI client at {url}/v1 (any api_key), e.g.\n"
             f"  curl -N {url}/v1/chat/completions -H 'Content-Type: application/json' "
             "-d '{\"model\":\"demo\",\"stream\":true,\"messages\":[{\"role\":\"user\",\"content\":\"hi\"}]}'\n"
             f"  OpenAI(base_url=\"{url}/v1\", api_key=\"x\")\n"
             f"Sidecar metrics: http://127.0.0.1:{sidecar_metrics}/metrics    Stop: Ctrl-C\n")
        deadline = None if cfg.duration is None else time.monotonic() + cfg.duration
        last = collections.Counter[str]()
        while deadline is None or time.monotonic() < deadline:
            wait = cfg.status_every if deadline is None else min(cfg.status_every, deadline - time.monotonic())
            time.sleep(max(0.0, wait))
            if sidecar.poll() is not None:
                raise LaunchError(f"the sidecar exited with status {sidecar.returncode}; see its log above")
            now = collections.Counter(traffic.served)
            delta = now - last
            last = now
            echo(f"-- last {cfg.status_every:.0f}s: {_shares(delta)}"
                 + (f"  errors: {dict(traffic.errors)}" if traffic.errors else "")
                 + (f"  retried: {traffic.retried}" if traffic.retried else ""))
            proc = subprocess.run(_fdngx("status", "-i", str(inv), "--out", str(conf)),
                                  capture_output=True, text=True, timeout=60)
            echo(proc.stdout.rstrip() or proc.stderr.rstrip())
        echo(_whole_run(traffic))
        return dict(traffic.served)
    except KeyboardInterrupt:
        echo("\nfdngx demo: stopping")
        if traffic:
            echo(_whole_run(traffic))
        return dict(traffic.served) if traffic else {}
    finally:
        for load in (traffic, bypass):
            if load is not None:
                load.close()
        for proc in (sidecar, nginx_proc):
            if proc is not None:
                stop_popen_group(proc)
        if launched:
            with contextlib.suppress(Exception):
                echo(_run(_fdngx("stop", "--inventory", str(inv)), echo).strip())


def _shares(served: collections.Counter[str]) -> str:
    total = sum(served.values())
    share = "  ".join(f"{k}: {100 * v / (total or 1):.0f}%" for k, v in sorted(served.items()))
    return f"{total} requests, share by replica port: {share}"


def _whole_run(traffic: Traffic) -> str:
    """The requests nginx served per replica port over the whole run: what the weights added up to."""
    return f"-- whole run through nginx: {_shares(collections.Counter(traffic.served))}"


def _wait_http(url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(requests.RequestException):
            if requests.get(url, timeout=1).status_code == 200:
                return
        time.sleep(0.1)
    raise LaunchError(f"{url} did not answer 200 within {timeout:.0f}s")
