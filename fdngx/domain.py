"""Shared value types. No fdngx imports here: every layer may use these, and they use nothing of ours.

- The closed sets a user picks from (Mode, Flavor, Engine, Balancer, Restart, Role) as string enums, so
  typer validates them, JSON writes their value, and code compares members instead of strings.
- Instance and Inventory (the replicas behind one upstream), ServerState (what the policy decided for
  one), LoadSample (what one scrape saw on one).
- Listen (ADDR:PORT parsing and formatting) and hostport (the one place that puts IPv6 in brackets).
"""

from __future__ import annotations

import functools
import ipaddress
import re
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class StrEnum(str, Enum):
    """A string enum whose str() and format() are its value (enum.StrEnum needs Python 3.11)."""

    def __str__(self) -> str:
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)

    @classmethod
    def values(cls) -> tuple[str, ...]:
        return tuple(m.value for m in cls)


class FailOpen(StrEnum):
    """Why the weight policy gave nginx every replica back at its static weight (it fails open)."""

    UNHEALTHY = "all replicas fail /health"  # a full outage, or a health check that is wrong for every replica
    STALE = "no replica has fresh metrics"  # the replicas answer /health; their load cannot be read


class Mode(StrEnum):
    """What `render` writes: the upstream block alone, upstream + server, or a whole nginx.conf."""

    UPSTREAM = "upstream"
    SITE = "site"
    STANDALONE = "standalone"


class Flavor(StrEnum):
    """nginx: weights in the config (a change is a reload). openresty: a Lua balancer fed by pushes."""

    NGINX = "nginx"
    OPENRESTY = "openresty"


class Engine(StrEnum):
    FASTDEPLOY = "fastdeploy"
    VLLM = "vllm"
    SGLANG = "sglang"
    SIM = "sim"


class Balancer(StrEnum):
    """How the Lua balancer picks: the least loaded replica, or the better of two random ones."""

    LEAST = "least"
    P2C = "p2c"


class Restart(StrEnum):
    NO = "no"
    ON_FAILURE = "on-failure"


class QueueEstimate(StrEnum):
    """Where a replica's backlog came from when the engine does not report it (FastDeploy before
    num_requests_enqueued): its request counters at the scrape, or the growth of its queue-time histogram."""

    COUNTERS = "request counters"
    QUEUE_TIMES = "queue times"


class Role(StrEnum):
    MIXED = "mixed"
    PREFILL = "prefill"
    DECODE = "decode"


def is_ip(host: str) -> bool:
    """An IPv4 or IPv6 literal, without a scope id (`fe80::1%eth0` is refused: it cannot reach nginx safely)."""
    if "%" in host:
        return False
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def hostport(host: str, port: int) -> str:
    """`host:port` as nginx and URLs want it: IPv6 literals in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def canonical_hostport(text: str) -> str:
    """`host:port` (as hostport writes it) in its canonical spelling (address_key); unparsable text as it is.
    A state written before a spelling became canonical (`localhost` before it was 127.0.0.1) still matches."""
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        return text
    return hostport(*address_key(host.removeprefix("[").removesuffix("]"), int(port)))


@functools.lru_cache(maxsize=8192)
def address_key(host: str, port: int) -> tuple[str, int]:
    """The canonical (host, port) of a server: one spelling per address (an IPv4-mapped IPv6 address is its
    IPv4 one; a name in lower case without a trailing dot; `localhost` is 127.0.0.1), for duplicate detection
    and for telling whether a name still stands for the same server. Cached: the policy asks it of every
    replica every cycle (5 ms a cycle at 1,000 replicas uncached); addresses change seldom; the cache is
    bounded."""
    if is_ip(host):
        ip = ipaddress.ip_address(host)
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return ip.compressed, port
    name = host.lower().rstrip(".")
    return ("127.0.0.1" if name == "localhost" else name), port  # nginx's resolver reads /etc/hosts


_LISTEN = re.compile(r"(?:(?P<host>\[[0-9A-Fa-f:.]+\]|\*|[A-Za-z0-9.-]+):)?(?P<port>[0-9]{1,5})")
_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")
# A last label the C library would read as a number (inet_aton: `999`, `0x7f000001`, `127.1`, `1.0x7f`):
# nginx hands a name it cannot parse to getaddrinfo, which turns these into addresses.
_NUMERIC_LABEL = re.compile(r"[0-9]+|0[xX][0-9A-Fa-f]*")


def natural_key(name: str) -> list[Any]:
    """dp2 sorts before dp10."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


@dataclass(frozen=True)
class Listen:
    """An `ADDR:PORT` (or `PORT`) to listen on. `host` is unbracketed; `*` or '' (a bare port, as nginx
    reads it) mean every IPv4 address."""

    host: str
    port: int

    @classmethod
    def parse(cls, text: str, what: str = "--listen", *, allow_zero: bool = False) -> Listen:
        """Raises ValueError with a message naming `what`; port 0 (pick a free one) only with allow_zero."""
        m = _LISTEN.fullmatch(text.strip()) if isinstance(text, str) else None
        port = int(m.group("port")) if m else -1
        lo = 0 if allow_zero else 1
        host = (m.group("host") or "").strip("[]") if m else "?"
        if not m or not lo <= port <= 65535 or not (host in ("", "*") or is_ip(host) or _hostname(host)):
            raise ValueError(f"{what} {text!r} must be ADDR:PORT or PORT (e.g. 127.0.0.1:8080, [::1]:8080, 8080)")
        if (why := _unservable(host)) is not None:
            raise ValueError(f"{what} {text!r}: {why}")
        return cls(host, port)

    def overlaps(self, other: Listen) -> bool:
        """Would the two listeners share a socket: the same port, and the same address or a wildcard of its
        family (`8080`, `*:8080` and `0.0.0.0:8080` take every IPv4 address; `[::]:8080` every IPv6 one)."""
        if self.port != other.port:
            return False
        a, b = address_key(self.bind_host, 0)[0], address_key(other.bind_host, 0)[0]
        if a == b:
            return True
        family = {"0.0.0.0": 4, "::": 6}
        return any(w in family and is_ip(o) and ipaddress.ip_address(o).version == family[w]
                   for w, o in ((a, b), (b, a)))

    @property
    def bind_host(self) -> str:
        return "0.0.0.0" if self.host in ("", "*") else self.host

    @property
    def reach_host(self) -> str:
        """Where this machine reaches the listener: a wildcard address means loopback."""
        return {"": "127.0.0.1", "*": "127.0.0.1", "0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.host, self.host)

    def url(self, path: str = "") -> str:
        return f"http://{hostport(self.reach_host, self.port)}{path}"

    def __str__(self) -> str:
        """The nginx `listen` argument (and what a user would type)."""
        if self.host in ("", "*"):
            return f"{self.host}:{self.port}" if self.host else str(self.port)
        return hostport(self.host, self.port)


def _unservable(host: str) -> str | None:
    """Why nginx cannot serve on `host`, an address it would accept all the same (or refuse only in words of
    its own): None when it can. A multicast address passes `nginx -t` and the reload, and then nothing answers."""
    if not is_ip(host):
        return None
    ip = ipaddress.ip_address(host)
    if group_address(host) == "multicast":
        return "a multicast address: nginx takes it and then serves nothing there; give an address of this host"
    if group_address(host) == "broadcast":
        return "the broadcast address: give an address of this host"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return f"an IPv4-mapped address, which nginx cannot listen on: write {ip.ipv4_mapped}"
    if isinstance(ip, ipaddress.IPv6Address) and ip.is_link_local:
        return "a link-local address needs a scope id, which nginx's listen does not take: give another address"
    return None


def _hostname(host: str) -> bool:
    """An RFC 1123 hostname whose last label has a letter and is not a number in any form inet_aton reads
    (so `999`, `127.1` or `0x7f000001` are not names)."""
    if not host or len(host) > 253:
        return False
    labels = (host[:-1] if host.endswith(".") else host).split(".")
    last = labels[-1]
    return (all(_LABEL.fullmatch(label) for label in labels) and any(c.isalpha() for c in last)
            and not _NUMERIC_LABEL.fullmatch(last))


def valid_host(host: str) -> bool:
    """True for an IPv4/IPv6 literal (no scope id) or an RFC 1123 hostname: the only hosts safe in config;
    not a multicast or broadcast address (no server is there; nginx refuses some)."""
    return isinstance(host, str) and ((is_ip(host) and group_address(host) is None) or _hostname(host))


def group_address(host: str) -> str | None:
    """'multicast' or 'broadcast' when the IP literal `host` is one (IPv4-mapped ones too), else None."""
    ip = ipaddress.ip_address(host)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_multicast:
        return "multicast"
    return "broadcast" if ip.packed == b"\xff" * 4 else None


@dataclass
class Instance:
    """One replica: an API port to proxy to and a metrics port to scrape."""

    name: str
    host: str
    port: int
    metrics_port: int
    engine: Engine = Engine.FASTDEPLOY
    max_num_seqs: int = 64
    weight: int = 1
    role: Role = Role.MIXED
    extra: dict[str, Any] = field(default_factory=dict)
    # Planned maintenance (`fdngx drain`): no new requests, those in flight finish. Written only when true,
    # so an inventory without it stays byte-identical when saved again.
    drain: bool = False

    @property
    def address(self) -> str:
        """`host:port` as nginx wants it (IPv6 in brackets)."""
        return hostport(self.host, self.port)

    @property
    def metrics_url(self) -> str:
        return f"http://{hostport(self.host, self.metrics_port)}/metrics"

    @property
    def base_url(self) -> str:
        return f"http://{self.address}"

    def to_dict(self) -> dict[str, Any]:
        known = {
            "name": self.name, "host": self.host, "port": self.port, "metrics_port": self.metrics_port,
            "engine": self.engine.value, "max_num_seqs": self.max_num_seqs, "weight": self.weight,
            "role": self.role.value,
        }
        if self.drain:
            known["drain"] = True
        return {**known, **self.extra}


@dataclass
class Inventory:
    """The instances behind one nginx upstream."""

    instances: list[Instance]
    upstream: str = "fastdeploy"
    version: int = 1
    extra: dict[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()

    def by_name(self) -> dict[str, Instance]:
        return {i.name: i for i in self.instances}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "upstream": self.upstream,
            **self.extra,
            "instances": [i.to_dict() for i in self.instances],
        }


@dataclass(frozen=True)
class ServerState:
    """What the policy decided for one instance: overrides the inventory's static weight."""

    weight: int
    down: bool = False
    # nginx's `backup`: no requests of nginx's own while the primaries are available (traffic from elsewhere
    # already fills it); unlike `down`, it still takes requests when every other replica has failed.
    backup: bool = False


@dataclass(frozen=True)
class Load:
    """The load signals read from one metrics page (see fdngx.weights.scrape.load_from_metrics)."""

    running: float = 0.0
    queued: float = 0.0
    kv_usage: float | None = None
    capacity: float | None = None
    queued_reliable: bool = True
    # Counters of the engine's time-per-output-token histogram (sum of seconds, observations): the policy
    # turns their increase between scrapes into the replica's decode speed.
    tpot_sum: float | None = None
    tpot_count: float | None = None
    # Sum of the queue-time histogram (seconds); requests the engine received and has not finished (its
    # received counter minus its success counter); and where `queued` was estimated from (see memory).
    queue_time_sum: float | None = None
    unfinished: float | None = None
    queue_estimate: QueueEstimate | None = None


@dataclass(frozen=True)
class LoadSample:
    """What one scrape saw on one instance. `ok` means the load numbers are usable."""

    name: str
    ok: bool
    healthy: bool
    running: float = 0.0
    queued: float = 0.0
    kv_usage: float | None = None
    capacity: float | None = None
    queued_reliable: bool = True
    tpot_sum: float | None = None
    tpot_count: float | None = None
    queue_estimate: QueueEstimate | None = None  # `queued` was estimated (from what), not read from a gauge
    scraped_at: float = 0.0
    latency: float = 0.0
    error: str | None = None
    # Why /health was not 200 ("404", "connection refused", ...): shown in down reasons.
    health_error: str | None = None
    # /health was refused at once (nothing listens): nginx's passive check retries such a replica's requests
    # elsewhere in about a millisecond, so taking it out with a reload is not urgent.
    refused: bool = False

    @classmethod
    def of(cls, name: str, healthy: bool, load: Load, **meta: Any) -> LoadSample:
        """A usable sample from the signals one metrics page gave."""
        return cls(
            name, True, healthy, load.running, load.queued, load.kv_usage, load.capacity, load.queued_reliable,
            load.tpot_sum, load.tpot_count, load.queue_estimate, **meta,
        )

    @property
    def load(self) -> float:
        """Requests on the replica, against the slots it reports (see requests)."""
        return self.requests(self.capacity)

    def requests(self, slots: float | None) -> float:
        """Requests on the replica: running plus the backlog. Where the engine does not report its backlog
        reliably (FastDeploy before num_requests_enqueued: `waiting` reads ~0 under a backlog), a replica with
        every slot busy is assumed to hold a queue as long as its slots: its backlog is unknown, not zero, and
        a balancer that took it for zero would keep feeding it."""
        if self.queued_reliable:
            return self.running + self.queued
        full = slots is not None and slots >= 1 and self.running >= slots
        return self.running + (slots if full and slots is not None else 0.0)
