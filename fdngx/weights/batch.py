"""All of a cycle's GETs on one thread: non-blocking sockets and one epoll loop (fleet scale).

`HttpClient` (fdngx.weights.fetch) runs each GET on a pool thread through http.client: fine for 16
replicas, but at 1,000 replicas (2,000 GETs a cycle) the pool's bookkeeping, the threads' hand-offs of the
GIL and http.client's header parsing cost ~0.35 ms of CPU per GET (measured: 0.79 s of CPU a cycle against
replicas that answer at once, 0.23 s here, parsing included). `BatchClient.get_many` runs every GET as a
small state machine on one selector: connect (or reuse a kept-alive connection), send, read the response
(fdngx.weights.http1), hand the connection back. Nothing waits on anything else, so a replica that hangs or
drips never holds another (there is no pool of 64 threads to fill).

It keeps HttpClient's contract, result for result: the same connect and read (inactivity) timeouts, the
total deadline, the byte cap, one retry on a fresh connection when a kept-alive one turns out closed, the
same error texts ("connection refused", "connect timeout", "read timeout", "scrape deadline exceeded",
"connection closed by the server", "response over N bytes"). Hosts that are not IP literals (the plain
nginx flavor allows names) are looked up on the pool (fdngx.weights.dial: remembered, never waited on past
the deadline), then read by the same loop, with the name in the Host header; each of a name's addresses is
tried in turn, as http.client's create_connection does. Whatever goes wrong with one GET (a socket the
system refuses, EMFILE, a bug) fails that GET only: never the cycle.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import heapq
import ipaddress
import itertools
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

from fdngx.weights.dial import Addresses, Resolver, raise_fd_limit, with_port
from fdngx.weights.fetch import Fetch, HttpClient, _describe, _oversize
from fdngx.weights.http1 import Closed, Refused, Response

log = logging.getLogger("fdngx.scrape")
_RECV = 256 * 1024
_IN_FLIGHT = 1024  # requests under way at once (each holds a socket)
_LOOKUP_POLL = 0.005  # while a name's first lookup runs, how often the loop looks (a cache hit never waits)


@dataclass(frozen=True)
class Job:
    """One GET: `post` (optional) turns a finished Fetch into the one to keep (e.g. parse the page)."""

    key: Hashable
    url: str
    max_bytes: int
    status_only: bool = False
    post: Callable[[Fetch], Fetch] | None = None


class _Req:
    __slots__ = ("addr", "addrs", "at", "expires", "first", "job", "out", "request", "resp", "reused", "sock",
                 "start", "state", "tries")

    def __init__(self, job: Job, addr: tuple[str, int], addrs: Addresses | None, request: bytes) -> None:
        # addr: (host, port) as the URL names it, the key of kept-alive connections; addrs: where to connect
        # ((family, sockaddr), in order; None: a name not looked up yet).
        self.job, self.addr, self.addrs, self.request = job, addr, addrs, request
        self.start = time.monotonic()
        self.tries = 0
        self.reset()

    def reset(self) -> None:
        self.out = self.request
        self.sock: socket.socket | None = None
        self.state = "connect"  # connect | send | read | done
        self.resp = Response(self.job.max_bytes)
        self.reused = False
        self.expires = 0.0
        self.at = 0  # the next of addrs to try
        self.first: OSError | None = None  # the first address's failure: told when every address failed


class BatchClient(HttpClient):
    """HttpClient plus get_many(): the scrape's GETs on one thread (fdngx.weights.scrape uses it when given)."""

    def __init__(self, max_idle_per_host: int = 2) -> None:
        super().__init__(max_idle_per_host)
        self._raw_idle: dict[tuple[str, int], list[socket.socket]] = {}
        self._names = Resolver()
        self._warned: set[tuple[tuple[str, int], str]] = set()

    def get_many(self, jobs: Sequence[Job], *, connect_timeout: float, read_timeout: float,
                 deadline: float) -> dict[Hashable, Fetch]:
        """Every job's Fetch, by key, within `deadline` (monotonic); a job with no answer by then is missing."""
        raise_fd_limit(len(jobs))
        results: dict[Hashable, Fetch] = {}
        work: list[_Req] = []
        for job in jobs:
            try:
                work.append(_request(job))
            except Exception as exc:  # a URL that does not split (never from a valid inventory)
                results[job.key] = Fetch(None, b"", 0.0, _describe(exc, connected=False))
        self._forget_except({req.addr for req in work})
        names = {req.addr[0] for req in work if req.addrs is None}
        if names:
            self._names.ask(names, self.executor())
        try:
            loop = _Loop(self, work, connect_timeout, read_timeout, deadline, results)
        except OSError as exc:  # no epoll descriptor (EMFILE): every GET fails, the cycle goes on
            results.update((req.job.key, Fetch(None, b"", 0.0, _describe(exc, connected=False))) for req in work)
            return results
        loop.run()
        return results

    def _forget_except(self, keep: set[tuple[str, int]]) -> None:
        """Close the kept-alive connections (and forget the names) of replicas this cycle does not ask: those
        that left the inventory (a rollout on new addresses) would otherwise stay open for good."""
        with self._lock:
            raw = [s for k in [k for k in self._raw_idle if k not in keep] for s in self._raw_idle.pop(k)]
            conns = [c for k in [k for k in self._idle if k not in keep] for c in self._idle.pop(k)]
            self._warned = {w for w in self._warned if w[0] in keep}
        for sock in raw:
            sock.close()
        for conn in conns:
            conn.close()
        self._names.keep_only({host for host, _port in keep})

    def _take_raw(self, key: tuple[str, int]) -> socket.socket | None:
        with self._lock:
            socks = self._raw_idle.get(key)
            return socks.pop() if socks else None

    def _give_raw(self, key: tuple[str, int], sock: socket.socket) -> None:
        with self._lock:
            socks = self._raw_idle.setdefault(key, [])
            if len(socks) < self._max_idle:
                socks.append(sock)
                return
        sock.close()

    def _warn(self, addr: tuple[str, int], exc: BaseException) -> None:
        """One WARNING per replica address and kind of failure that is not one of the usual ones (a bug)."""
        with self._lock:
            if (addr, type(exc).__name__) in self._warned:
                return
            self._warned.add((addr, type(exc).__name__))
        log.warning("scrape of %s port %d failed (%s: %s); that GET counts as failed, the others go on", addr[0],
                    addr[1], type(exc).__name__, ascii(str(exc))[1:-1][:200])

    def close(self) -> None:
        super().close()
        with self._lock:
            socks = [s for ss in self._raw_idle.values() for s in ss]
            self._raw_idle.clear()
        for s in socks:
            s.close()


def _request(job: Job) -> _Req:
    parts = urlsplit(job.url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    try:
        version = ipaddress.ip_address(host).version
    except ValueError:
        version = 0  # a host name: looked up on the pool
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    where = f"[{host}]" if version == 6 else host
    request = (f"GET {path} HTTP/1.1\r\nHost: {where}:{port}\r\nAccept-Encoding: identity\r\n"
               "Accept: text/plain\r\n\r\n").encode("latin-1")
    family = socket.AF_INET6 if version == 6 else socket.AF_INET
    return _Req(job, (host, port), [(family, (host, port))] if version else None, request)


class _Loop:
    def __init__(self, client: BatchClient, work: list[_Req], connect_timeout: float, read_timeout: float,
                 deadline: float, results: dict[Hashable, Fetch]) -> None:
        self.client, self.results = client, results
        self.ready = collections.deque(req for req in work if req.addrs is not None)
        self.waiting = [req for req in work if req.addrs is None]  # on a name's lookup
        self.connect_timeout, self.read_timeout, self.deadline = connect_timeout, read_timeout, deadline
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, _Req]] = []
        self.seq = itertools.count()
        self.open = 0

    def run(self) -> None:
        try:
            while True:
                if self.waiting:
                    self._looked_up()
                self._start_more()
                now = time.monotonic()
                if not (self.open or self.waiting) or now > self.deadline + 0.05:
                    return
                self._expire(now)
                wait = min(self.timers[0][0] - now if self.timers else 0.05, self.deadline + 0.05 - now)
                if self.waiting:
                    wait = min(wait, _LOOKUP_POLL)
                for key, _events in self.sel.select(max(0.0, wait)):
                    self._step(key.data)
        finally:
            for key in list(self.sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]  # unfinished at the deadline: not reusable
            self.sel.close()

    def _looked_up(self) -> None:
        still = []
        for req in self.waiting:
            got = self.client._names.answer(req.addr[0])
            if got is None:
                still.append(req)
            elif isinstance(got, BaseException):
                self._done(req, Fetch(None, b"", time.monotonic() - req.start, _describe(got, connected=False)))
            else:
                req.addrs = [(family, with_port(sockaddr, req.addr[1])) for family, sockaddr in got]
                self.ready.append(req)
        self.waiting = still

    def _start_more(self) -> None:
        while self.open < _IN_FLIGHT and self.ready:
            req = self.ready.popleft()
            if time.monotonic() >= self.deadline:
                continue  # not started by the deadline: dropped, as a job still queued for the pool would be
            self.open += 1
            req.start = time.monotonic()
            self._begin(req)

    def _arm(self, req: _Req, seconds: float) -> None:
        req.expires = min(time.monotonic() + seconds, self.deadline)
        heapq.heappush(self.timers, (req.expires, next(self.seq), req))

    def _expire(self, now: float) -> None:
        while self.timers and self.timers[0][0] <= now:
            at, _n, req = heapq.heappop(self.timers)
            if req.state == "done" or at != req.expires:
                continue  # finished, or re-armed since
            if now >= self.deadline - 0.01:
                why = "scrape deadline exceeded"
            elif req.state == "connect" and req.addrs is not None and req.at < len(req.addrs):
                req.first = req.first or TimeoutError("timed out")  # this address: the next one, as
                self._drop(req)  # create_connection tries each in turn
                self._begin(req)
                continue
            else:
                connected = req.state != "connect"
                why = _describe((None if connected else req.first) or TimeoutError("timed out"), connected)
            self._finish(req, Fetch(None, b"", now - req.start, why))

    def _begin(self, req: _Req) -> None:
        """Reuse a kept-alive connection or connect to the next address; a socket the system refuses (EMFILE,
        EAFNOSUPPORT) or anything else failing here fails this request only."""
        try:
            sock = self.client._take_raw(req.addr) if req.tries == 0 and req.at == 0 else None
            if sock is not None:
                req.sock, req.reused, req.state = sock, True, "send"
                self.sel.register(sock, selectors.EVENT_WRITE, req)
                self._arm(req, self.read_timeout)
                return
            while req.addrs is not None and req.at < len(req.addrs):
                family, sockaddr = req.addrs[req.at]
                req.at += 1
                try:
                    req.sock = sock = socket.socket(family, socket.SOCK_STREAM)
                    sock.setblocking(False)
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    code = sock.connect_ex(sockaddr)
                    if code not in (0, errno.EINPROGRESS):
                        raise OSError(code, os.strerror(code))
                except OSError as exc:
                    self._drop(req)
                    req.first = req.first or exc
                    continue
                req.state = "connect"
                self.sel.register(sock, selectors.EVENT_WRITE, req)
                self._arm(req, self.connect_timeout)
                return
            self._fail(req, req.first or OSError(errno.EADDRNOTAVAIL, "no address"), connected=False)
        except Exception as exc:
            self._broken(req, exc)

    def _step(self, req: _Req) -> None:
        sock = req.sock
        if req.state == "done" or sock is None:
            return
        try:
            if req.state == "connect":
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    # OSError(code, ...) is ConnectionRefusedError & co., as a blocking connect raises them.
                    req.first = req.first or OSError(code, os.strerror(code))
                    self._drop(req)
                    self._begin(req)  # the name's next address, if any; else the first failure is told
                    return
                req.state = "send"
                self._arm(req, self.read_timeout)
            if req.state == "send":
                req.out = req.out[sock.send(req.out):]
                if not req.out:
                    req.state = "read"
                    self.sel.modify(sock, selectors.EVENT_READ, req)
                    self._arm(req, self.read_timeout)
                return
            data = sock.recv(_RECV)
            resp = req.resp
            done = resp.feed(data) if data else resp.eof()
            if resp.oversize:  # past the cap before the head is read: a failure, whatever the GET is for
                self._finish(req, Fetch(resp.status, b"", time.monotonic() - req.start,
                                        _oversize(req.job.max_bytes, req.job.status_only and resp.head_done)))
            elif done:
                got = Fetch(resp.status, resp.body(), time.monotonic() - req.start, None)
                self._finish(req, got, reusable=not resp.will_close)
            else:
                self._arm(req, self.read_timeout)
        except (BlockingIOError, InterruptedError):
            return
        except (Closed, ConnectionResetError, BrokenPipeError):
            if req.reused and not req.resp.started and req.tries == 0:
                self._drop(req)  # a kept-alive connection the server had closed: once more on a new one
                req.reset()
                req.tries = 1
                self._begin(req)
                return
            self._finish(req, Fetch(None, b"", time.monotonic() - req.start, "connection closed by the server"))
        except OSError as exc:
            self._fail(req, exc, connected=True)
        except Refused as exc:
            self._finish(req, Fetch(None, b"", time.monotonic() - req.start, str(exc)[:200]))
        except Exception as exc:  # a bug reading one answer (a RecursionError once) must not end the cycle
            self._broken(req, exc)

    def _fail(self, req: _Req, exc: OSError, *, connected: bool) -> None:
        self._finish(req, Fetch(None, b"", time.monotonic() - req.start, _describe(exc, connected)))

    def _broken(self, req: _Req, exc: Exception) -> None:
        """An exception no GET should raise: this request fails with its name, logged once per replica."""
        self.client._warn(req.addr, exc)
        self._drop(req)  # in an unknown state: never reused
        self._finish(req, Fetch(None, b"", time.monotonic() - req.start, type(exc).__name__))

    def _finish(self, req: _Req, got: Fetch, reusable: bool = False) -> None:
        if req.state == "done":
            return
        sock = req.sock
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(sock)
            if reusable:
                self.client._give_raw(req.addr, sock)
            else:
                sock.close()
        req.state, req.sock = "done", None
        self.open -= 1
        self._done(req, got)

    def _done(self, req: _Req, got: Fetch) -> None:
        req.state = "done"
        try:
            self.results[req.job.key] = req.job.post(got) if req.job.post is not None else got
        except Exception as exc:  # the page's own parsing catches its errors; anything else is a bug
            self.client._warn(req.addr, exc)
            self.results[req.job.key] = Fetch(None, b"", got.latency, type(exc).__name__)

    def _drop(self, req: _Req) -> None:
        if req.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(req.sock)
            req.sock.close()
            req.sock = None
