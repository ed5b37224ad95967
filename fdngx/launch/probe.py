"""Probes a launch needs: is a replica healthy (GET /health == 200), is a port free, who holds it."""

from __future__ import annotations

import contextlib
import errno
import http.client
import ipaddress
import os
import socket
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
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
    # The address the probe reached (the server's side of the connection): which listening socket answered
    # is told by it (foreign_listener). None when no connection was made.
    peer: str | None = field(default=None, compare=False)

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
        peer = _peer(conn)  # now: the connection is closed once an HTTP/1.0 answer is read
        resp = conn.getresponse()
        resp.read()
        if resp.status == 200:
            return Health(HealthState.HEALTHY, 200, peer=peer)
        return Health(HealthState.HTTP_STATUS, resp.status, peer=peer)
    except ConnectionRefusedError:
        return Health(HealthState.NOT_LISTENING)
    except TimeoutError:
        return Health(HealthState.TIMEOUT, detail=f"{timeout:.0f}s")
    except (OSError, http.client.HTTPException) as exc:
        return Health(HealthState.ERROR, detail=getattr(exc, "strerror", None) or type(exc).__name__)
    finally:
        conn.close()


def _peer(conn: http.client.HTTPConnection) -> str | None:
    with contextlib.suppress(OSError, AttributeError, IndexError):
        return str(conn.sock.getpeername()[0]).split("%", 1)[0]  # an IPv6 scope (fe80::1%eth0) is no address
    return None


def health_all(host: str, ports: dict[str, int], path: str = "/health", timeout: float = 2.0) -> dict[str, Health]:
    """health() of every {name: port} at once: hung replicas cost one timeout per round, not one each."""
    if len(ports) <= 1:
        return {name: health(host, port, path, timeout) for name, port in ports.items()}
    with ThreadPoolExecutor(max_workers=min(32, len(ports)), thread_name_prefix="fdngx-probe") as pool:
        futures = {name: pool.submit(health, host, port, path, timeout) for name, port in ports.items()}
        return {name: f.result() for name, f in futures.items()}


IP = ipaddress.IPv4Address | ipaddress.IPv6Address


def _address(hexaddr: str) -> IP:
    """A local address as /proc/net/tcp{,6} prints it: 32-bit words in host byte order, in hex. An IPv4
    address mapped into IPv6 (::ffff:127.0.0.1, a dual-stack socket bound to it) is the IPv4 one."""
    order = -1 if sys.byteorder == "little" else 1
    raw = b"".join(bytes.fromhex(hexaddr[i:i + 8])[::order] for i in range(0, len(hexaddr), 8))
    ip = ipaddress.ip_address(raw)
    return (ip.ipv4_mapped or ip) if isinstance(ip, ipaddress.IPv6Address) else ip


def _table(port: int, states: tuple[str, ...]) -> dict[str, IP]:
    """{'socket:[inode]': local address} of the TCP sockets on `port` in these states (0A LISTEN, 07 CLOSE:
    bound)."""
    found: dict[str, IP] = {}
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            rows = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for row in rows:
            f = row.split()
            if len(f) > 9 and f[3] in states and f[9] != "0":
                addr, _, hexport = f[1].rpartition(":")
                if int(hexport, 16) == port:
                    with contextlib.suppress(ValueError):
                        found[f"socket:[{f[9]}]"] = _address(addr)
    return found


_ANY4, _ANY6 = ipaddress.IPv4Address("0.0.0.0"), ipaddress.IPv6Address("::")


def _answering(listeners: dict[str, IP], to: IP) -> set[str]:
    """Of the listening sockets on a port, those a connection to address `to` reaches, as Linux picks them:
    the ones bound to that very address; else, for IPv4, those bound to 0.0.0.0; else those bound to ::
    (which take IPv4 too, unless IPV6_V6ONLY, which /proc does not show)."""
    tiers = [{to}, {_ANY4}, {_ANY6}] if to.version == 4 else [{to}, {_ANY6}]
    for tier in tiers:
        if found := {s for s, a in listeners.items() if a in tier}:
            return found
    return set()


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
    inodes = set(_table(port, ("0A", "07")))
    return _holder(inodes) if inodes else None


def foreign_listener(address: str, port: int, ours: set[int]) -> str | None:
    """Who else answers on `address`:`port`, when a process outside `ours` (a child and its descendants)
    holds a listening socket a connection there reaches (one bound to that address, else a wildcard one):
    /health answered 200 there may be somebody else's server. A listener on another address of this
    machine (127.0.0.2 while the replica binds 127.0.0.1) is not, whoever holds it. `address` is where the
    probe connected (Health.peer); when it is no IP address, every listener on the port counts. None when
    every such socket is ours, or when it cannot be told (/proc shows none, a process of ours is not
    readable)."""
    listeners = _table(port, ("0A",))
    try:
        to = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        inodes = set(listeners)
    else:
        inodes = _answering(listeners, getattr(to, "ipv4_mapped", None) or to)
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


