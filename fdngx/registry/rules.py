"""The registry's policies, as small values parsed from its command-line options: who may register
(sources), which addresses may be registered (targets), where a registered instance's metrics live when
its body does not say, how names are resolved, and how often one source may call.

Every parse error is a UsageError naming the option, so `fdngx sidecar` exits 2 with one line.
"""

from __future__ import annotations

import ipaddress
import json
import re
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path

from fdngx.domain import Listen
from fdngx.errors import UsageError
from fdngx.nginx.local import takes
from fdngx.system.files import read_regular_file

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

LOOPBACK = ("127.0.0.0/8", "::1/128")
# RFC 1918 and IPv6 unique local addresses: where data-parallel replicas of one deployment live.
PRIVATE = ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "fc00::/7")
KEYWORDS = {"loopback": LOOPBACK, "private": PRIVATE}
DEFAULT_ALLOW = "loopback,private"
# --registry-targets only: a registration may name only the address it came from (after the loopback rule).
PEER = "peer"
DEFAULT_MAX_INSTANCES = 1024  # --registry-max-instances
# Never a replica, whatever an allow-list says: nginx would proxy to a link-local metadata service
# (169.254.169.254), a multicast group, or "any address".
_NEVER = tuple(
    ipaddress.ip_network(n)
    for n in ("169.254.0.0/16", "fe80::/10", "224.0.0.0/4", "ff00::/8", "0.0.0.0/8", "::/128",
              "240.0.0.0/4", "255.255.255.255/32")
)


def reachable(ip: IPAddress, remote: IPAddress | None) -> IPAddress:
    """FastDeploy takes host_ip from gethostbyname(gethostname()) (fastdeploy/utils.py get_host_ip), which
    is 127.0.1.1 on Debian: a registration from another machine that claims loopback means "the address
    you see me at". `ip` is the address host_ip means here (a name resolved), so `localhost` counts too."""
    if ip.is_loopback and remote is not None and not remote.is_loopback:
        return remote
    return ip


def canonical_ip(text: str) -> IPAddress | None:
    """An IP literal (no scope id), IPv4-mapped IPv6 turned into IPv4; None for anything else."""
    if "%" in text:
        return None
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


@dataclass(frozen=True)
class Networks:
    """An allow-list of CIDRs, parsed from `loopback,private,10.1.0.0/16,...`. With `allow_peer` (for
    --registry-targets) the keyword `peer` may be in it: the registered address must then be the caller's
    own, and in one of the CIDRs too when any are listed."""

    networks: tuple[IPNetwork, ...]
    text: str
    peer: bool = False

    @classmethod
    def parse(cls, text: str, option: str, *, allow_peer: bool = False) -> Networks:
        nets: list[IPNetwork] = []
        peer = False
        for item in (t.strip() for t in text.split(",")):
            if not item:
                continue
            if item.lower() == PEER:
                if not allow_peer:
                    raise UsageError(f"{option} '{PEER}': a keyword of --registry-targets only; give CIDRs or "
                                     f"{', '.join(KEYWORDS)}")
                peer = True
                continue
            for cidr in KEYWORDS.get(item.lower(), (item,)):
                try:
                    nets.append(ipaddress.ip_network(cidr, strict=False))
                except ValueError:
                    raise UsageError(
                        f"{option} {item!r}: not a CIDR (e.g. 10.0.0.0/8, fd00::/8) or one of "
                        f"{', '.join(KEYWORDS)}"
                    ) from None
        if not nets and not peer:
            raise UsageError(f"{option} is empty: give CIDRs or {', '.join(KEYWORDS)}")
        return cls(tuple(nets), text, peer)

    def allows(self, ip: IPAddress) -> bool:
        """`ip` is in one of the networks (`peer` alone lists none: the caller's address is checked apart)."""
        if not self.networks:
            return self.peer
        return any(ip.version == n.version and ip in n for n in self.networks)


def never_registrable(ip: IPAddress) -> str | None:
    """Why `ip` can never be a replica (link-local, multicast, unspecified, reserved), or None."""
    for net in _NEVER:
        if ip.version == net.version and ip in net:
            kind = ("link-local" if ip.is_link_local else "multicast" if ip.is_multicast
                    else "unspecified" if ip.is_unspecified else "reserved")
            return f"{ip} is a {kind} address"
    return None


# -- metrics port rule (--registry-metrics-port) ---------------------------------------------------------

_OFFSET = re.compile(r"[+-][0-9]{1,5}")
_FIXED = re.compile(r"[0-9]{1,5}")
_TABLE_KEY = re.compile(r"(?:(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+):)?(?P<port>[0-9]{1,5})")
MAX_TABLE_BYTES = 1 << 20


@dataclass(frozen=True)
class MetricsRule:
    """Where a registered instance's metrics live when its body has no `metrics_port` and its API port
    serves no usable /metrics: a fixed port (`9001`), an offset from the API port (`+1000`, `-100`), or a
    JSON table file `{"8001": 9001, "10.0.0.5:8002": 9102}` (host:port entries win over port entries)."""

    text: str
    fixed: int | None = None
    offset: int | None = None
    table: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, text: str, option: str = "--registry-metrics-port") -> MetricsRule:
        text = text.strip()
        if _OFFSET.fullmatch(text):
            return cls(text, offset=int(text))
        if _FIXED.fullmatch(text):
            port = int(text)
            if not 1 <= port <= 65535:
                raise UsageError(f"{option} {text}: a port must be 1..65535")
            return cls(text, fixed=port)
        path = Path(text)
        try:
            data = json.loads(read_regular_file(path, MAX_TABLE_BYTES))
        except FileNotFoundError:
            raise UsageError(f"{option} {text!r}: not a port, an offset (+1000) or an existing table file") from None
        except (OSError, ValueError, RecursionError) as exc:
            raise UsageError(f"{option} {text}: cannot read the table: {exc}") from None
        if not isinstance(data, dict):
            raise UsageError(f'{option} {text}: the table must be a JSON object like {{"8001": 9001}}')
        table = []
        for key, value in data.items():
            m = _TABLE_KEY.fullmatch(key)
            if not m or type(value) is not int or not 1 <= value <= 65535 or not 1 <= int(m.group("port")) <= 65535:
                raise UsageError(f"{option} {text}: entry {key!r}: {value!r} must map PORT or HOST:PORT to a port")
            table.append((key.lower(), value))
        return cls(text, table=tuple(table))

    def port_for(self, hosts: Iterable[str], port: int) -> int | None:
        """The metrics port this rule gives for an instance at one of `hosts` (stored host, name sent) and
        `port`, or None when it gives none."""
        if self.fixed is not None:
            return self.fixed
        if self.offset is not None:
            p = port + self.offset
            return p if 1 <= p <= 65535 else None
        entries = dict(self.table)
        for host in hosts:
            h = f"[{host}]" if ":" in host else host
            if f"{h.lower()}:{port}" in entries:
                return entries[f"{h.lower()}:{port}"]
        return entries.get(str(port))


# -- name resolution ---------------------------------------------------------------------------------------

Resolver = Callable[[str], list[str]]
RESOLVE_TIMEOUT = 2.0


def system_resolver(name: str) -> list[str]:
    """The addresses `name` resolves to (getaddrinfo, TCP); [] when it does not resolve."""
    try:
        infos = socket.getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        return []
    return [str(info[4][0]) for info in infos]


class NameCache:
    """Names are resolved once: a name that resolved keeps its first answer for the registry's life (what
    went into the inventory must stay what the name meant); a failure is not cached (it may resolve
    later). The resolver runs with a timeout on a small pool, so a slow DNS holds no request worker long."""

    def __init__(self, resolver: Resolver = system_resolver, size: int = 1024, timeout: float = RESOLVE_TIMEOUT):
        self.resolver = resolver
        self.size = size
        self.timeout = timeout
        self._cache: OrderedDict[str, list[str]] = OrderedDict()
        self._lock = threading.Lock()
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="fdngx-resolve")

    def resolve(self, name: str) -> list[str]:
        key = name.lower().rstrip(".")
        with self._lock:
            if key in self._cache:
                return self._cache[key]
        job = self._pool.submit(self.resolver, name)
        try:
            found = job.result(timeout=self.timeout)
        except FutureTimeout:
            job.cancel()  # still queued behind slow lookups: it never runs (a running one cannot be stopped)
            return []
        except Exception:  # an injected resolver may raise; that means "does not resolve"
            return []
        if found:
            with self._lock:
                self._cache[key] = list(found)
                while len(self._cache) > self.size:
                    self._cache.popitem(last=False)
        return list(found)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


# -- rate limit --------------------------------------------------------------------------------------------


def rate_key(source: str) -> str:
    """The bucket a source address draws from: its own (canonical: an IPv4-mapped address is its IPv4 one).
    Not its IPv6 /64: the callers are the allow-listed nodes of a deployment, and a data-centre or cloud subnet
    is one /64 for many nodes, whose heartbeats would share one bucket and be refused together. A host rotating
    through its own /64 gets a bucket per address; what it can take is still bounded by the server's fixed
    pool of connections, and refused heartbeats cost no instance its place while its /health passes."""
    ip = canonical_ip(source)
    return source if ip is None else str(ip)


class RateLimit:
    """A token bucket per source address (rate_key): `burst` calls at once, then `rate` per second, for at most
    `max_sources` addresses (the least recently seen are forgotten). FastDeploy posts once per 5 s per
    instance, so a node with 16 data-parallel ranks uses about 3 calls/s."""

    def __init__(self, rate: float = 10.0, burst: float = 40.0, clock: Callable[[], float] = time.monotonic,
                 max_sources: int = 4096) -> None:
        self.rate, self.burst, self.clock, self.max_sources = rate, burst, clock, max_sources
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()

    def allow(self, source: str) -> bool:
        now = self.clock()
        source = rate_key(source)
        with self._lock:
            tokens, at = self._buckets.pop(source, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate)
            ok = tokens >= 1.0
            self._buckets[source] = (tokens - 1.0 if ok else tokens, now)
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
            return ok


# -- all of the above, from `fdngx sidecar`'s options ----------------------------------------------------


@dataclass(frozen=True)
class RegistrySettings:
    grace: float = 30.0  # s without a heartbeat (or failing /health) before removal; 0: never remove
    check_interval: float = 5.0  # golang_router config.go HealthCheckIntervalSecs default
    targets: Networks = field(default_factory=lambda: Networks.parse(DEFAULT_ALLOW, "--registry-targets"))
    metrics_rule: MetricsRule | None = None
    reprobe_after: float = 60.0  # an instance with no load signal: look for its metrics again this often
    max_instances: int = DEFAULT_MAX_INSTANCES  # registry-owned instances; a new one beyond is refused (507)
    own: tuple[tuple[str, Listen], ...] = ()  # fdngx's own listeners here (option, address): never a replica

    def own_listener(self, host: str, port: int) -> str | None:
        """Whose `host:port` is when it is one of fdngx's own listeners on this host ("fdngx's own --listen
        ..."), never a replica. They answer /health too: nginx's --listen registered stopped every apply
        (nginx would proxy to itself) while a healthy replica registered after it never took a request; the
        registry's or a metrics port put 404s and 405s in rotation (an outside review). None: not ours."""
        return next((f"fdngx's own {option} {listen}" for option, listen in self.own if takes(listen, host, port)),
                    None)

    @classmethod
    def from_options(cls, grace: float = 30.0, targets: str = DEFAULT_ALLOW, metrics_port: str | None = None,
                     max_instances: int = DEFAULT_MAX_INSTANCES) -> RegistrySettings:
        """From `fdngx sidecar`'s --registry-* options; UsageError names the option that is wrong."""
        if not grace >= 0:
            raise UsageError("--registry-grace must be >= 0 (0: never remove registered instances)")
        if type(max_instances) is not int or max_instances < 1:
            raise UsageError(f"--registry-max-instances {max_instances}: must be an integer >= 1 (registered "
                             "instances the registry keeps; a new registration beyond it is refused)")
        # Heartbeats and /health are checked every 5 s like the Go router, or faster under a short grace.
        interval = min(5.0, max(0.5, grace / 4)) if grace > 0 else 5.0
        rule = MetricsRule.parse(metrics_port) if metrics_port else None
        return cls(grace, interval, Networks.parse(targets, "--registry-targets", allow_peer=True), rule,
                   max_instances=max_instances)
