"""What the batch scrape loop (fdngx.weights.batch) needs before it dials: the addresses of replicas given by
host name, looked up off the loop's thread and remembered, and enough file descriptors for a cycle's sockets.

Resolving a name blocks (getaddrinfo), so `Resolver` asks on a pool thread, one lookup per name at a time,
and the loop never waits on it past its deadline. A name's addresses serve for TTL seconds; after that they
still serve while a new lookup runs, and a failed lookup forgets them (the name must resolve, as for
http.client, which looked it up at every connection).
"""

from __future__ import annotations

import logging
import resource
import socket
import threading
import time
from collections.abc import Iterable
from concurrent.futures import Executor, Future

log = logging.getLogger("fdngx.scrape")

TTL = 30.0  # seconds a lookup's answer serves before the next lookup (it serves on while that one runs)
# (family, address) for each of a name's IPv4 and IPv6 addresses; the port is the caller's
Addresses = list[tuple[int, tuple[object, ...]]]


def lookup(name: str) -> Addresses:
    """getaddrinfo's stream addresses of `name`, in its order, IPv4 and IPv6 only."""
    found: Addresses = []
    for family, _type, _proto, _canon, sockaddr in socket.getaddrinfo(name, None, type=socket.SOCK_STREAM):
        if family in (socket.AF_INET, socket.AF_INET6) and (family, sockaddr) not in found:
            found.append((family, sockaddr))
    if not found:
        raise socket.gaierror(socket.EAI_NONAME, f"no IPv4 or IPv6 address for {name}")
    return found


def with_port(sockaddr: tuple[object, ...], port: int) -> tuple[object, ...]:
    return (sockaddr[0], port, *sockaddr[2:])


class Resolver:
    def __init__(self, ttl: float = TTL) -> None:
        self._ttl = ttl
        self._known: dict[str, tuple[float, Addresses]] = {}  # name -> (when looked up, addresses)
        self._asked: dict[str, Future[Addresses]] = {}  # lookups under way
        self._lock = threading.Lock()

    def ask(self, names: Iterable[str], pool: Executor) -> None:
        """Start a lookup of each name not known, or known for longer than the TTL (none already under way)."""
        now = time.monotonic()
        with self._lock:
            for name in names:
                known = self._known.get(name)
                if name not in self._asked and (known is None or now - known[0] >= self._ttl):
                    try:
                        self._asked[name] = pool.submit(lookup, name)
                    except RuntimeError as exc:  # a pool shut down (the interpreter exiting): told as the answer
                        self._asked[name] = failed = Future()
                        failed.set_exception(exc)

    def answer(self, name: str) -> Addresses | BaseException | None:
        """The addresses of `name` (the last known ones while a new lookup runs), the error of a lookup that
        failed (given once: the next `ask` asks again), or None: not known yet."""
        with self._lock:
            asked = self._asked.get(name)
            if asked is not None and asked.done():
                del self._asked[name]
                error = None if asked.cancelled() else asked.exception()  # cancelled: the pool closed; asked anew
                if error is not None:
                    self._known.pop(name, None)
                    return error
                if not asked.cancelled():
                    self._known[name] = (time.monotonic(), asked.result())
            known = self._known.get(name)
            return known[1] if known is not None else None

    def keep_only(self, names: set[str]) -> None:
        """Forget names no longer asked for (a lookup under way ends on its own and is dropped)."""
        with self._lock:
            for table in (self._known, self._asked):
                for name in [n for n in table if n not in names]:
                    del table[name]


_raised_for = [0]  # the most sockets raise_fd_limit was applied for (a list: one mutable cell)
_raise_lock = threading.Lock()


def raise_fd_limit(jobs: int) -> None:
    """A cycle of `jobs` GETs holds a socket per GET in flight and up to two kept-alive ones per replica port:
    lift the soft open-files limit towards the hard one when it is short of that (systemd's default soft
    limit is 1024), as Go programs do at start: at the sidecar's start for the inventory of then
    (fdngx.commands.sidecar), and again whenever the fleet grows past what it was lifted for (the scrape
    loop). Never lowers it; says so when even the hard limit is short."""
    with _raise_lock:
        if jobs <= _raised_for[0]:
            return
        _raised_for[0] = jobs
    want = 2 * jobs + 256  # the sidecar's 4 per instance + 256, per GET (about two GETs per instance)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= want or soft == resource.RLIM_INFINITY:
        return
    new = hard if hard == resource.RLIM_INFINITY else min(hard, max(want, soft))
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
    except (ValueError, OSError):
        new = soft
    if new != resource.RLIM_INFINITY and new < want:
        log.warning("open-files limit %d is low for %d scrape GETs a cycle (want %d: LimitNOFILE= in the unit)",
                    new, jobs, want)
