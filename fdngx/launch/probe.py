"""Probes a launch needs: is a replica healthy (GET /health == 200), is a port free, who holds it."""

from __future__ import annotations

import contextlib
import errno
import http.client
import os
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from fdngx.domain import StrEnum
from fdngx.errors import LaunchError
from fdngx.system import procs


def probe_host(host: str) -> str:
    """Where to probe an instance from this machine: a wildcard listen address means loopback."""
    return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host)


class HealthState(StrEnum):
    """What one GET /health saw."""

    HEALTHY = "healthy"  # 200
    NOT_LISTENING = "not-listening"  # connection refused: nothing bound yet (a model loads), or the rank died
    HTTP_STATUS = "http-status"  # an answer other than 200 (FastDeploy: 404 no worker heartbeat, 304 no weights)
    TIMEOUT = "timeout"  # connected, no answer in time
    ERROR = "error"  # any other socket or protocol error


@dataclass(frozen=True)
class Health:
    state: HealthState
    status: int | None = None  # the HTTP status, for HTTP_STATUS
    detail: str = ""  # the error's words, for ERROR; the timeout, for TIMEOUT

    @property
    def ok(self) -> bool:
        return self.state is HealthState.HEALTHY

    def __str__(self) -> str:
        """What a person reads in progress lines, the pidfile and errors."""
        if self.state is HealthState.HEALTHY:
            return "healthy"
        if self.state is HealthState.NOT_LISTENING:
            return "not listening yet"
        if self.state is HealthState.HTTP_STATUS:
            return f"HTTP {self.status}"
        if self.state is HealthState.TIMEOUT:
            return f"no answer in {self.detail}"
        return self.detail or "error"


def health(host: str, port: int, path: str = "/health", timeout: float = 2.0) -> Health:
    """One GET of the health path. Only 200 is healthy: FastDeploy answers 404/304 while its workers are not."""
    conn = http.client.HTTPConnection(probe_host(host), port, timeout=timeout)
    try:
        conn.request("GET", path)
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            return Health(HealthState.HEALTHY, 200)
        return Health(HealthState.HTTP_STATUS, resp.status)
    except ConnectionRefusedError:
        return Health(HealthState.NOT_LISTENING)
    except TimeoutError:
        return Health(HealthState.TIMEOUT, detail=f"{timeout:.0f}s")
    except (OSError, http.client.HTTPException) as exc:
        return Health(HealthState.ERROR, detail=getattr(exc, "strerror", None) or type(exc).__name__)
    finally:
        conn.close()


def health_all(host: str, ports: dict[str, int], path: str = "/health", timeout: float = 2.0) -> dict[str, Health]:
    """health() of every {name: port} at once: hung replicas cost one timeout per round, not one each."""
    if len(ports) <= 1:
        return {name: health(host, port, path, timeout) for name, port in ports.items()}
    with ThreadPoolExecutor(max_workers=min(32, len(ports)), thread_name_prefix="fdngx-probe") as pool:
        futures = {name: pool.submit(health, host, port, path, timeout) for name, port in ports.items()}
        return {name: f.result() for name, f in futures.items()}


def _sockets(port: int, states: tuple[str, ...]) -> set[str]:
    """The 'socket:[inode]' links of TCP sockets on `port` in these states (0A LISTEN, 07 CLOSE: bound)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and int(f[1].rsplit(":", 1)[1], 16) == port and f[3] in states and f[9] != "0":
                inodes.add(f"socket:[{f[9]}]")
    return inodes


def fd_links(pid: int, strict: bool = False) -> set[str]:
    """What the open descriptors of `pid` point to (paths, 'socket:[inode]'); empty when not readable (gone,
    or, unless `strict`, not ours to look into: PermissionError)."""
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except PermissionError:
        if strict:
            raise
        return set()
    except OSError:
        return set()
    out = set()
    for fd in fds:
        with contextlib.suppress(OSError):
            out.add(os.readlink(f"/proc/{pid}/fd/{fd}"))
    return out


def _holder(inodes: set[str]) -> str | None:
    for pid in sorted(int(d) for d in os.listdir("/proc") if d.isdigit()):
        if fd_links(pid) & inodes:
            return f"pid {pid} ({procs.cmdline(pid)[:80]})"
    return None


def port_holder(port: int) -> str | None:
    """'pid N (command)' holding a TCP port, from /proc; None when not visible (another user's process)."""
    # LISTEN and CLOSE (bound, not listening): both block a server's bind.
    inodes = _sockets(port, ("0A", "07"))
    return _holder(inodes) if inodes else None


def foreign_listener(port: int, ours: set[int]) -> str | None:
    """Who else listens on `port`, when a process outside `ours` (a child and its descendants) holds one of its
    listening sockets: /health answered 200 there may be somebody else's server. None when every listening
    socket is ours, or when it cannot be told (/proc shows none, a process of ours is not readable)."""
    inodes = _sockets(port, ("0A",))
    for pid in ours:
        if not inodes:
            return None
        try:
            inodes -= fd_links(pid, strict=True)
        except PermissionError:
            return None  # one of ours runs as another user: whose socket it is cannot be told
    if not inodes:
        return None
    return _holder(inodes) or "a process fdngx cannot see"


def port_free(host: str, port: int) -> bool:
    """Can a server bind `port`? Checks the wildcard address too: FastDeploy binds 0.0.0.0 for its checks."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    wildcard = "::" if family == socket.AF_INET6 else "0.0.0.0"
    for addr in dict.fromkeys((host, wildcard)):
        with socket.socket(family, socket.SOCK_STREAM) as s:
            # Servers set SO_REUSEADDR, so lingering TIME_WAIT connections must not count as busy.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                s.bind((addr, port))
            except OSError as exc:
                if exc.errno == errno.EADDRINUSE:
                    return False
                if exc.errno != errno.EADDRNOTAVAIL:
                    raise LaunchError(f"cannot check port {port} on {addr}: {exc.strerror}") from None
    return True


def check_ports(host: str, ports: list[int]) -> None:
    busy = [p for p in ports if not port_free(host, p)]
    if not busy:
        return
    where = "; ".join(
        f"port {p} is in use by {port_holder(p) or f'a process fdngx cannot see (try: ss -ltnp sport = :{p})'}"
        for p in busy
    )
    raise LaunchError(f"{where}: stop it or choose other ports (--base-port/--ports); nothing was started")


