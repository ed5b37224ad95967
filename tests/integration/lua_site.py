"""A real nginx with the OpenResty flavor (Debian's nginx + libnginx-mod-http-lua), rendered by the CLI,
in front of tiny backends: one process per backend, so a test can kill and restart one."""

from __future__ import annotations

import collections
import signal
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import requests

from fdngx.domain import Listen
from fdngx.nginx.admin import Admin
from fdngx.nginx.openresty import lua_modules
from tests.support import Backends, Nginx, fdngx, free_ports, write_inventory

needs_lua = [
    pytest.mark.nginx,
    pytest.mark.skipif(not lua_modules(None), reason="needs libnginx-mod-http-lua (make test installs it)"),
]


class LuaSite:
    def __init__(self, tmp: Path, n: int = 2, *, capacities: list[int] | None = None, weights: list[int] | None = None,
                 delay: float = 0.05, listed: int | None = None, mode: str = "standalone",
                 render_args: tuple[str, ...] = ()) -> None:
        self.tmp = tmp
        self.names = [f"b{i}" for i in range(n)]
        self.ports = dict(zip(self.names, free_ports(n), strict=True))
        self.capacities = dict(zip(self.names, capacities or [64] * n, strict=True))
        self.weights = dict(zip(self.names, weights or [1] * n, strict=True))
        self.delay = delay
        self.backends: dict[str, Backends] = {}
        self.nginx: Nginx | None = None
        try:
            for name in self.names:
                self.start_backend(name)
            self.inv = tmp / "fdngx.json"
            self.list(self.names[: listed or n])
            self.port, admin_port = free_ports(2)
            self.url = f"http://127.0.0.1:{self.port}"
            self.conf = tmp / "nginx" / ("nginx.conf" if mode == "standalone" else "fdngx-upstream.conf")
            self.conf.parent.mkdir(exist_ok=True)
            self.args = ["-i", str(self.inv), "--mode", mode, "--flavor", "openresty", "--listen",
                         str(self.port), "--admin-listen", f"127.0.0.1:{admin_port}", "--out", str(self.conf),
                         *render_args]
            fdngx("render", *self.args, check=True)
            if mode == "upstream":
                self.write_host_config()
            self.token_file = self.conf.parent / f".{self.conf.name}.fdngx-admin-token"
            self.peers_file = self.conf.parent / f".{self.conf.name}.fdngx-peers"
            self.admin = Admin(Listen("127.0.0.1", admin_port), self.token_file.read_text().strip())
            self.nginx = Nginx(self.conf.parent).start(f"{self.url}/health")
        except BaseException:
            self.stop()
            raise

    def write_host_config(self) -> None:
        """--mode upstream: the sysadmin's own nginx.conf includes the rendered file; like most hand-written
        configs it never mentions $request_id."""
        loads = "".join(f"load_module {m};\n" for m in lua_modules(None))
        (self.conf.parent / "nginx.conf").write_text(f"""{loads}worker_processes 2;
pid logs/nginx.pid;
error_log logs/error.log warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path tmp/client_body;
    proxy_temp_path tmp/proxy;
    include {self.conf.name};
    server {{
        listen 127.0.0.1:{self.port};
        location /v1/ {{
            proxy_pass http://fastdeploy;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_next_upstream error timeout http_502 http_503 http_429;
        }}
        location = /health {{ return 200 "ok"; }}
    }}
}}
""")

    # -- the replicas ------------------------------------------------------------------------------------

    def list(self, names: list[str]) -> None:
        """Write the inventory with these replicas."""
        write_inventory(self.inv, [
            {"name": n, "host": "127.0.0.1", "port": self.ports[n], "metrics_port": self.ports[n],
             "max_num_seqs": self.capacities[n], "weight": self.weights[n]}
            for n in names
        ])

    def start_backend(self, name: str) -> None:
        self.backends[name] = Backends([self.ports[name]], [name], delay=self.delay)

    def stop_backend(self, name: str) -> None:
        self.backends.pop(name).stop()

    def kill_backend(self, name: str) -> None:
        """SIGKILL: the process and its open connections go at once. A SIGTERM waits for the backend's handler,
        which on a loaded machine can run after the requests it was to cut have been answered."""
        self.backends.pop(name).stop(signal.SIGKILL)

    # -- traffic and the balancer's view -------------------------------------------------------------------

    def one(self, timeout: float = 30.0) -> str:
        try:
            r = requests.post(f"{self.url}/v1/completions", json={}, timeout=timeout)
        except requests.RequestException:
            return "error"
        return r.headers.get("X-Fdngx-Replica", f"status {r.status_code}")

    def split(self, n: int, workers: int = 1) -> collections.Counter[str]:
        with ThreadPoolExecutor(workers) as pool:
            return collections.Counter(pool.map(lambda _: self.one(), range(n)))

    def view(self) -> dict[str, dict[str, str]]:
        return self.admin.view()[1]

    def generation(self) -> int:
        return int(self.admin.view()[0]["generation"])

    def inflight(self) -> dict[str, int]:
        return {name: int(f["inflight"]) for name, f in self.view().items()}

    def snapshot(self, generation: int, peers: dict[str, tuple[int, int, float]]) -> str:
        """A push body: {name: (weight, down, load)} for listed backends, capacities from the inventory."""
        lines = [f"generation {generation}"]
        for name, (weight, down, load) in peers.items():
            lines.append(f"peer {name} 127.0.0.1 {self.ports[name]} {weight} {down} {self.capacities[name]} {load:.3f}")
        return "\n".join(lines) + "\n"

    def error_log(self) -> str:
        return (self.conf.parent / "logs" / "error.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.nginx is not None:
            self.nginx.stop()
        for b in self.backends.values():
            b.stop()
        self.backends.clear()
