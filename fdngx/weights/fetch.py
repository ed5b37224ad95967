"""Bounded HTTP GETs for the scraper: connect/read timeouts, a byte cap, a total deadline, keep-alive reuse.

`HttpClient` speaks HTTP/1.1 with http.client and keeps idle connections per (host, port): about 0.12 ms
of CPU per GET against 0.5 ms through requests, which is the difference between ~1.5 % and ~4 % of a core
for a sidecar scraping 16 replicas every second. It never uses an HTTP(S)_PROXY: replicas are reached
directly. The client owns a thread pool that lives as long as it does, so a 1 s loop does not start 32
threads a cycle; `Client` is the interface a test double implements.
"""

from __future__ import annotations

import collections
import http.client
import socket
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

MAX_WORKERS = 64
CHUNK = 64 * 1024
DEADLINE = "scrape deadline exceeded"  # a GET's error when its total deadline passed
_STALE = (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError, http.client.BadStatusLine)


@dataclass(frozen=True)
class Fetch:
    status: int | None
    body: bytes
    latency: float
    error: str | None
    # A metrics page's values, parsed by the worker that fetched it (fdngx.weights.scrape: while the other
    # fetches still wait on the network); None: not parsed there (the caller parses, and reports any error).
    values: dict[str, list[float]] | None = None


class Client:
    """Shared part: the worker pool. Subclasses implement `get`."""

    def __init__(self) -> None:
        self._pool: ThreadPoolExecutor | None = None
        self._pool_lock = threading.Lock()

    def executor(self) -> ThreadPoolExecutor:
        with self._pool_lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=MAX_WORKERS, thread_name_prefix="fdngx-scrape")
            return self._pool

    def get(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        deadline: float,
        max_bytes: int,
        status_only: bool = False,
    ) -> Fetch:
        raise NotImplementedError

    def close(self) -> None:
        with self._pool_lock:
            if self._pool is not None:
                # A thread stuck in connect() ends on its own timeout; nobody waits for it.
                self._pool.shutdown(wait=False, cancel_futures=True)
                self._pool = None


def run_all(pool: ThreadPoolExecutor, jobs: Sequence[tuple[Hashable, Callable[..., Any], dict[str, Any]]],
            until: float, workers: int = MAX_WORKERS) -> dict[Hashable, Any]:
    """Run `jobs` ((key, function, kwargs)) on `workers` of the pool's threads, each taking the next job from
    one shared queue (what the pool itself would do with one future per job, without a Future, a work item
    and a wake-up per job: at 2,000 GETs a cycle that bookkeeping cost as much CPU as the GETs). Returns the
    results of the jobs done by `until` (monotonic); a job not started by then is dropped, one still running
    is left to finish on its own. A job's exception is raised here, as Future.result() would."""
    queue = collections.deque(jobs)
    results: dict[Hashable, Any] = {}
    errors: dict[Hashable, BaseException] = {}
    left = [len(queue)]
    lock = threading.Lock()
    done = threading.Event()

    def drain() -> None:
        while True:
            try:
                key, fn, kwargs = queue.popleft()
            except IndexError:
                return
            if time.monotonic() < until:
                try:
                    results[key] = fn(**kwargs)
                except BaseException as exc:  # re-raised in the caller's thread
                    errors[key] = exc
            with lock:
                left[0] -= 1
                if left[0] == 0:
                    done.set()

    if not queue:
        return {}
    for _ in range(min(workers, len(queue))):
        pool.submit(drain)
    done.wait(timeout=max(0.0, until - time.monotonic()) + 0.05)
    got = dict(results)  # one C-level copy under the GIL: late results stay out
    for exc in dict(errors).values():
        raise exc
    return got


def _oversize(max_bytes: int, status_only: bool) -> str | None:
    return None if status_only else f"response over {max_bytes} bytes"


class HttpClient(Client):
    def __init__(self, max_idle_per_host: int = 2) -> None:
        super().__init__()
        self._idle: dict[tuple[str, int], list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._max_idle = max_idle_per_host

    def _take(self, key: tuple[str, int]) -> http.client.HTTPConnection | None:
        with self._lock:
            conns = self._idle.get(key)
            return conns.pop() if conns else None

    def _give(self, key: tuple[str, int], conn: http.client.HTTPConnection) -> None:
        with self._lock:
            conns = self._idle.setdefault(key, [])
            if len(conns) < self._max_idle:
                conns.append(conn)
                return
        conn.close()

    def get(
        self,
        url: str,
        *,
        connect_timeout: float,
        read_timeout: float,
        deadline: float,
        max_bytes: int,
        status_only: bool = False,
    ) -> Fetch:
        start = time.monotonic()
        parts = urlsplit(url)
        key = (parts.hostname or "127.0.0.1", parts.port or 80)
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        conn = self._take(key)
        # A kept-alive connection the server closed meanwhile fails on first use: retry once on a new one.
        for attempt in (0, 1):
            reused = conn is not None
            if conn is None:
                conn = http.client.HTTPConnection(key[0], key[1], timeout=connect_timeout)
                conn._create_connection = _bounded_connection  # type: ignore[attr-defined]
            try:
                return self._exchange(conn, key, path, start, read_timeout, deadline, max_bytes, status_only)
            except _STALE as exc:
                conn.close()
                conn = None
                if not reused or attempt:
                    return Fetch(None, b"", time.monotonic() - start, _describe(exc, connected=True))
            except (OSError, http.client.HTTPException) as exc:
                connected = conn.sock is not None
                conn.close()
                late = isinstance(exc, TimeoutError) and time.monotonic() >= deadline - 0.01
                why = DEADLINE if late else _describe(exc, connected)
                return Fetch(None, b"", time.monotonic() - start, why)
        raise AssertionError("unreachable")

    def _exchange(
        self,
        conn: http.client.HTTPConnection,
        key: tuple[str, int],
        path: str,
        start: float,
        read_timeout: float,
        deadline: float,
        max_bytes: int,
        status_only: bool,
    ) -> Fetch:
        def arm() -> None:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("scrape deadline exceeded")
            if conn.sock is not None:
                conn.sock.settimeout(min(read_timeout, left))
                if isinstance(conn.sock, _Bounded):
                    conn.sock.deadline, conn.sock.read_timeout = deadline, read_timeout

        if conn.sock is None:
            conn.timeout = max(0.01, min(conn.timeout or read_timeout, deadline - time.monotonic()))
            conn.connect()
        arm()
        conn.request("GET", path, headers={"Accept": "text/plain"})
        resp = conn.getresponse()
        chunks: list[bytes] = []
        size = 0
        while True:
            arm()
            # read1: at most one recv, so a server dripping a byte at a time cannot keep us in one call.
            chunk = resp.read1(CHUNK)
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                conn.close()
                return Fetch(resp.status, b"", time.monotonic() - start, _oversize(max_bytes, status_only))
            chunks.append(chunk)
        # read1 does not mark a Content-Length response finished at its end; close() does, and leaves the
        # socket open for the next request unless the server asked to close it.
        will_close = resp.will_close
        resp.close()
        if will_close:
            conn.close()
        else:
            self._give(key, conn)
        return Fetch(resp.status, b"".join(chunks), time.monotonic() - start, None)

    def close(self) -> None:
        super().close()
        with self._lock:
            conns = [c for cs in self._idle.values() for c in cs]
            self._idle.clear()
        for c in conns:
            c.close()


class _Bounded(socket.socket):
    """A socket whose every read waits at most until the GET's deadline: http.client reads a status line and
    headers in as many recvs as the server likes, each with a fresh timeout, so a server sending a byte
    every half second would otherwise hold the thread (and the connection) for good."""

    deadline = float("inf")
    read_timeout: float | None = None

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError("scrape deadline exceeded")
        self.settimeout(left if self.read_timeout is None else min(self.read_timeout, left))
        return super().recv_into(buffer, nbytes, flags)


def _bounded_connection(address: tuple[str, int], timeout: float | None, source: Any = None) -> socket.socket:
    """http.client's socket.create_connection, the connected socket made a _Bounded one."""
    plain = socket.create_connection(address, timeout, source)
    sock = _Bounded(plain.family, plain.type, plain.proto, fileno=plain.detach())
    sock.settimeout(timeout)
    return sock


def _describe(exc: BaseException, connected: bool) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, TimeoutError | socket.timeout):
        text = str(exc)
        if "deadline" in text:
            return DEADLINE
        return "read timeout" if connected else "connect timeout"
    if isinstance(exc, _STALE):
        return "connection closed by the server"
    return f"{type(exc).__name__}: {exc}"[:200]
