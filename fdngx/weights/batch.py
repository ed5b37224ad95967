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
nginx flavor allows names) go through HttpClient.get on the pool meanwhile: resolving a name blocks.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import ipaddress
import itertools
import os
import selectors
import socket
import time
from collections.abc import Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from fdngx.weights.fetch import Fetch, HttpClient, _describe, _oversize, run_all
from fdngx.weights.http1 import Closed, Refused, Response

_RECV = 256 * 1024
_IN_FLIGHT = 1024  # requests under way at once (each holds a socket)


@dataclass(frozen=True)
class Job:
    """One GET: `post` (optional) turns a finished Fetch into the one to keep (e.g. parse the page)."""

    key: Hashable
    url: str
    max_bytes: int
    status_only: bool = False
    post: Callable[[Fetch], Fetch] | None = None


class _Req:
    __slots__ = ("addr", "expires", "family", "job", "out", "request", "resp", "reused", "sock", "start", "state",
                 "tries")

    def __init__(self, job: Job, addr: tuple[str, int], family: int, request: bytes) -> None:
        self.job, self.addr, self.family, self.request = job, addr, family, request
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


class BatchClient(HttpClient):
    """HttpClient plus get_many(): the scrape's GETs on one thread (fdngx.weights.scrape uses it when given)."""

    def __init__(self, max_idle_per_host: int = 2) -> None:
        super().__init__(max_idle_per_host)
        self._raw_idle: dict[tuple[str, int], list[socket.socket]] = {}

    def get_many(self, jobs: Sequence[Job], *, connect_timeout: float, read_timeout: float,
                 deadline: float) -> dict[Hashable, Fetch]:
        """Every job's Fetch, by key, within `deadline` (monotonic); a job with no answer by then is missing."""
        loop: list[tuple[Job, tuple[str, int], int, bytes]] = []
        named: list[tuple[Hashable, Callable[..., Any], dict[str, Any]]] = []
        for job in jobs:
            parts = urlsplit(job.url)
            host, port = parts.hostname or "127.0.0.1", parts.port or 80
            try:
                family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
            except ValueError:
                named.append((job.key, self._get_post, {"job": job, "connect_timeout": connect_timeout,
                                                        "read_timeout": read_timeout, "deadline": deadline}))
                continue
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            where = f"[{host}]" if family == socket.AF_INET6 else host
            request = (f"GET {path} HTTP/1.1\r\nHost: {where}:{port}\r\nAccept-Encoding: identity\r\n"
                       "Accept: text/plain\r\n\r\n").encode("latin-1")
            loop.append((job, (host, port), family, request))
        results: dict[Hashable, Fetch] = {}
        pool = self.executor() if named else None
        # Started first, collected last: names resolve on pool threads while the loop runs.
        threaded = pool.submit(run_all, pool, named, deadline, 8) if pool is not None else None
        _Loop(self, loop, connect_timeout, read_timeout, deadline, results).run()
        if threaded is not None:
            results.update(threaded.result(timeout=max(0.0, deadline - time.monotonic()) + 0.1))
        return results

    def _get_post(self, job: Job, **common: Any) -> Fetch:
        got = self.get(job.url, max_bytes=job.max_bytes, status_only=job.status_only, **common)
        return job.post(got) if job.post is not None else got

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

    def close(self) -> None:
        super().close()
        with self._lock:
            socks = [s for ss in self._raw_idle.values() for s in ss]
            self._raw_idle.clear()
        for s in socks:
            s.close()


class _Loop:
    def __init__(self, client: BatchClient, work: list[tuple[Job, tuple[str, int], int, bytes]],
                 connect_timeout: float, read_timeout: float, deadline: float, results: dict[Hashable, Fetch]) -> None:
        self.client, self.work, self.results = client, work, results
        self.connect_timeout, self.read_timeout, self.deadline = connect_timeout, read_timeout, deadline
        self.sel = selectors.DefaultSelector()
        self.timers: list[tuple[float, int, _Req]] = []
        self.seq = itertools.count()
        self.open = 0

    def run(self) -> None:
        pending = iter(self.work)
        try:
            self._start_more(pending)
            while self.open and time.monotonic() <= self.deadline + 0.05:
                now = time.monotonic()
                self._expire(now)
                wait = min(self.timers[0][0] - now if self.timers else 0.05, self.deadline + 0.05 - now)
                for key, _events in self.sel.select(max(0.0, wait)) if self.open else ():
                    self._step(key.data)
                self._start_more(pending)
        finally:
            for key in list(self.sel.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]  # unfinished at the deadline: not reusable
            self.sel.close()

    def _start_more(self, pending: Iterator[tuple[Job, tuple[str, int], int, bytes]]) -> None:
        while self.open < _IN_FLIGHT:
            item = next(pending, None)
            if item is None:
                return
            if time.monotonic() >= self.deadline:
                continue  # not started by the deadline: dropped, as a job still queued for the pool would be
            self.open += 1
            self._begin(_Req(*item))

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
            else:
                why = _describe(TimeoutError("timed out"), connected=req.state != "connect")
            self._finish(req, Fetch(None, b"", now - req.start, why))

    def _begin(self, req: _Req) -> None:
        sock = self.client._take_raw(req.addr) if req.tries == 0 else None
        if sock is not None:
            req.sock, req.reused, req.state = sock, True, "send"
            self.sel.register(sock, selectors.EVENT_WRITE, req)
            self._arm(req, self.read_timeout)
            return
        req.sock = sock = socket.socket(req.family, socket.SOCK_STREAM)
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        code = sock.connect_ex(req.addr)
        if code not in (0, errno.EINPROGRESS):
            self._fail(req, OSError(code, os.strerror(code)), connected=False)
            return
        self.sel.register(sock, selectors.EVENT_WRITE, req)
        self._arm(req, self.connect_timeout)

    def _step(self, req: _Req) -> None:
        sock = req.sock
        if req.state == "done" or sock is None:
            return
        try:
            if req.state == "connect":
                code = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if code:
                    # OSError(code, ...) is ConnectionRefusedError & co., as a blocking connect raises them.
                    self._fail(req, OSError(code, os.strerror(code)), connected=False)
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
            if resp.oversize:
                self._finish(req, Fetch(resp.status, b"", time.monotonic() - req.start,
                                        _oversize(req.job.max_bytes, req.job.status_only)))
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

    def _fail(self, req: _Req, exc: OSError, *, connected: bool) -> None:
        self._finish(req, Fetch(None, b"", time.monotonic() - req.start, _describe(exc, connected)))

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
        self.results[req.job.key] = req.job.post(got) if req.job.post is not None else got

    def _drop(self, req: _Req) -> None:
        if req.sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self.sel.unregister(req.sock)
            req.sock.close()
            req.sock = None
