"""Shared test helpers: free ports, condition waits, a real nginx under a temp prefix, tiny backends.

Everything here starts real processes and stops them by PID (process group), even when a test fails.
"""

from __future__ import annotations

import collections
import contextlib
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import requests

from fdngx.nginx.control import find_nginx, prepare_prefix
from fdngx.sim.process import _FLOOR, free_ports
from fdngx.system.procs import stop_popen_group as stop_process_group

__all__ = [
    "NEEDS_LUAJIT", "UNUSED_PORT", "Backends", "Nginx", "Site", "edit_in_place", "fdngx", "free_ports", "http_ok",
    "instances", "luajit_coprocess", "luajit_script", "stop_process_group", "wait_for",
]

# A replica port in a test's inventory that nothing connects to and nothing listens on: below the ports
# free_ports hands out, so no later free_ports call in the process can return it (the cursor wraps around
# after about 22,000 ports, and a module-level free_ports(1) once came back as a test's --admin-listen:
# test_listen_values, render refusing "would have nginx take its port"). It and the next one are used.
UNUSED_PORT = _FLOOR - 10

REPO = Path(__file__).resolve().parent.parent
BACKEND = Path(__file__).resolve().parent / "fixtures" / "echo_backend.py"
LUA_DIR = REPO / "templates" / "lua"

NEEDS_LUAJIT = pytest.mark.skipif(
    shutil.which("luajit") is None,
    reason="needs the luajit interpreter: apt-get install luajit2 (OpenResty's LuaJIT branch, the one nginx's Lua "
    "module runs on; Debian's `luajit` package works too)",
)


def luajit_script(path: Path, body: str) -> list[str]:
    """Write `body` as a luajit script that can `require` the balancer's modules (templates/lua, passed as
    arg[1]); returns the argv that runs it (append more arguments)."""
    path.write_text("package.path = arg[1] .. '/?.lua;' .. package.path\n" + body)
    return ["luajit", str(path), str(LUA_DIR)]


@contextlib.contextmanager
def luajit_coprocess(path: Path, body: str, text: bool = False) -> Iterator[subprocess.Popen[Any]]:
    """A luajit script answering on its stdout what it reads on its stdin, for the length of the block; then
    its stdin is closed and it must end (killed, and the block fails, if not within 10 s)."""
    proc = subprocess.Popen(luajit_script(path, body), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=text)
    try:
        yield proc
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise


def wait_for(cond: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05, what: str = "condition") -> Any:
    """Poll `cond` until it returns something truthy; fail the test with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = cond()
            if value:
                return value
        except Exception as exc:
            last_exc = exc
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what} (last error: {last_exc})")


def http_ok(url: str) -> bool:
    try:
        return requests.get(url, timeout=1).status_code == 200
    except requests.RequestException:
        return False


def fdngx(
    *args: str, cwd: Path | None = None, timeout: float = 120.0, check: bool = False
) -> subprocess.CompletedProcess[str]:
    """Run the real CLI in a subprocess (as users and cron do)."""
    proc = subprocess.run(
        [sys.executable, "-m", "fdngx", *args], capture_output=True, text=True, cwd=cwd, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"fdngx {' '.join(args)} exited {proc.returncode}: {proc.stderr}")
    return proc


class Backends:
    """Tiny HTTP replicas in one real process: each port answers /health and /v1/* with its name."""

    def __init__(self, ports: Sequence[int], names: Sequence[str] | None = None, delay: float = 0.0) -> None:
        self.ports = list(ports)
        self.names = list(names or [f"b{i}" for i in range(len(ports))])
        spec = ",".join(f"{p}={n}" for p, n in zip(self.ports, self.names, strict=True))
        self.proc = subprocess.Popen(
            [sys.executable, str(BACKEND), spec, str(delay)], start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            for p in self.ports:
                wait_for(lambda p=p: http_ok(f"http://127.0.0.1:{p}/health"), 20, what=f"backend on {p}")
        except BaseException:
            self.stop()
            raise

    def stop(self, sig: int = signal.SIGTERM) -> None:
        stop_process_group(self.proc, sig=sig)

    def __enter__(self) -> Backends:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


class Nginx:
    """A real nginx master (daemon off) under a temp prefix, started from a standalone config."""

    def __init__(self, prefix: Path, conf: Path | None = None) -> None:
        self.prefix = prefix
        self.conf = conf or prefix / "nginx.conf"
        self.binary = find_nginx()
        prepare_prefix(prefix)
        self.proc: subprocess.Popen[bytes] | None = None

    def argv(self, *extra: str) -> list[str]:
        return [self.binary, "-p", f"{self.prefix}/", "-c", str(self.conf), "-e", "logs/error.log", *extra]

    def test(self) -> subprocess.CompletedProcess[str]:
        return subprocess.run(self.argv("-t"), capture_output=True, text=True, timeout=30)

    def start(self, url: str | None = None, *, directives: str = "") -> Nginx:
        """Start nginx (plus `directives`, e.g. "master_process off;") and wait for its pid file and `url`."""
        self.proc = subprocess.Popen(
            self.argv("-g", f"daemon off; {directives}".strip()), start_new_session=True,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        pid_file = self.prefix / "logs" / "nginx.pid"
        try:
            wait_for(lambda: self.proc is not None and (self.proc.poll() is not None or pid_file.exists()), 20,
                     what="nginx pid file")
            if self.proc.poll() is not None:
                raise AssertionError(f"nginx exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            if url:
                wait_for(lambda: requests.get(url, timeout=1).status_code < 500, 20, what=f"nginx at {url}")
        except BaseException:
            self.stop()
            raise
        return self

    def worker_pids(self) -> set[int]:
        from fdngx.system.procs import children

        assert self.proc is not None
        return children(self.proc.pid)

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)

    def __enter__(self) -> Nginx:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def write_inventory(path: Path, instances: list[dict[str, Any]], upstream: str = "fastdeploy") -> Path:
    path.write_text(json.dumps({"version": 1, "upstream": upstream, "instances": instances}, indent=2))
    return path


@contextlib.contextmanager
def running(*things: Any) -> Iterator[None]:
    try:
        yield
    finally:
        for t in reversed(things):
            t.stop()


def instances(ports: list[int], weights: list[int]) -> list[dict[str, object]]:
    return [
        {"name": f"b{i}", "host": "127.0.0.1", "port": p, "metrics_port": p, "weight": w}
        for i, (p, w) in enumerate(zip(ports, weights, strict=True))
    ]


class Site:
    """A standalone nginx rendered by `fdngx render` from an inventory, in a temp dir."""

    def __init__(self, tmp: Path, backends: Backends, weights: list[int]) -> None:
        self.tmp = tmp
        self.backends = backends
        self.inv = write_inventory(tmp / "fdngx.json", instances(backends.ports, weights))
        self.port = free_ports(1)[0]
        self.conf = tmp / "nginx" / "nginx.conf"
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = ["-i", str(self.inv), "--mode", "standalone", "--listen", f"127.0.0.1:{self.port}",
                     "--out", str(self.conf)]
        fdngx("render", *self.args, check=True)
        self.nginx = Nginx(tmp / "nginx").start(f"{self.url}/health")

    def set_weights(self, weights: list[int]) -> None:
        write_inventory(self.inv, instances(self.backends.ports, weights))

    def apply(self, *extra: str) -> subprocess.CompletedProcess[str]:
        return fdngx("render", *self.args, "--reload", *extra)

    def generation(self) -> str:
        return requests.get(f"{self.url}/fdngx/generation", timeout=5).text.strip()

    def split(self, n: int) -> collections.Counter[str]:
        with requests.Session() as s:
            return collections.Counter(
                s.post(f"{self.url}/v1/chat/completions", json={}, timeout=10).headers["X-Fdngx-Replica"]
                for _ in range(n)
            )


class HealthyProbe:
    """A registry Probe (fdngx.registry.probe) that contacts nobody: every /health passes, no instance has a
    FastDeploy /metrics page on its API port."""

    def health(self, host: str, port: int) -> str | None:
        return None

    def metrics(self, host: str, port: int) -> str | None:
        return "HTTP 404"

    def close(self) -> None:
        pass


_EDIT_IN_PLACE = """
import os, sys
path, old, new = sys.argv[1], sys.argv[2].encode(), sys.argv[3].encode()
st = os.stat(path)
with open(path, "r+b") as f:
    data = f.read()
    if data.count(old) != 1 or len(old) != len(new):
        sys.exit(f"{path}: {old!r} is there {data.count(old)} times (want once), or {new!r} is not as long")
    f.seek(0)
    f.write(data.replace(old, new))
os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
"""


def edit_in_place(path: Path, old: str, new: str) -> None:
    """Another process rewrites `path` in place, `old` -> `new` (once, the same length), and sets its mtime
    back to the nanosecond: the same device, inode, size and mtime, as two edits within one tick of the
    kernel's clock look. Nothing of fdngx runs in it."""
    before = os.stat(path)
    subprocess.run([sys.executable, "-c", _EDIT_IN_PLACE, str(path), old, new], check=True, timeout=60)
    after = os.stat(path)
    assert (after.st_dev, after.st_ino, after.st_size, after.st_mtime_ns) == \
        (before.st_dev, before.st_ino, before.st_size, before.st_mtime_ns), "the stat tells the edit apart"


def token_file(tmp: Path, name: str = "token", text: str = "t" * 32) -> Path:
    """A private (0600) token file holding `text`."""
    path = tmp / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text + "\n")
    return path


def read_request(conn: socket.socket) -> bytes:
    """One HTTP request (head and Content-Length body); b"" when the client closed the connection."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    found = re.search(rb"(?im)^content-length: *([0-9]+)", head)
    while found and len(body) < int(found.group(1)):
        chunk = conn.recv(65536)
        if not chunk:
            return b""
        body += chunk
    return head + b"\r\n\r\n" + body


class AdminDouble:
    """What fdngx.nginx.target.Target needs of an admin client besides `push`, for test doubles of one."""

    url = "http://127.0.0.1:9/fdngx/peers"
    timeout = 2.0

    def deadline(self, seconds: float) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()


class RawServer:
    """A listener on 127.0.0.1 that runs `handler(conn)` on each connection in a daemon thread (the connection
    closed after it, OSErrors ignored): the hand-rolled peers of the wire tests. `port`; close() or `with`."""

    def __init__(self, handler: Callable[[socket.socket], None], backlog: int = 128) -> None:
        self.handler = handler
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=backlog)
        self.port = int(self.sock.getsockname()[1])
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _addr = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            self.handler(conn)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        self.sock.close()

    def __enter__(self) -> RawServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Answers(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status)
        self.end_headers()

    def log_message(self, *a: Any) -> None:
        pass


@contextlib.contextmanager
def answering(host: str, port: int = 0, status: int = 200) -> Iterator[http.server.ThreadingHTTPServer]:
    """Somebody else's HTTP server on host:port (this process; port 0: any, see server_address): every GET, a
    /health probe too, gets `status` and no body. Shut down and closed on leaving."""
    handler = type("Answers", (_Answers,), {"status": status})
    srv = http.server.ThreadingHTTPServer((host, port), handler)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def self_signed(tmp: Path) -> tuple[Path, Path]:
    """A self-signed certificate and key for 127.0.0.1 (openssl; the tests' HTTPS listeners)."""
    if shutil.which("openssl") is None:
        pytest.skip("needs the openssl command to make a self-signed certificate (python cryptography is not "
                    "installed either)")
    cert, key = tmp / "cert.pem", tmp / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1"], check=True, capture_output=True, timeout=60)
    return cert, key
