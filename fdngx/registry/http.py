"""The registry's HTTP side: FastDeploy's router endpoints on `--registry-listen`, hardened.

Routes as in `fastdeploy/golang_router/internal/router/router.go` (POST /register, GET /registered,
/registered_number, /health_generate) plus the Python router's GET /health (`fastdeploy/router/router.py`).
/metrics and /v1/* are answered 404 with where to go instead (fdngx's metrics are on --metrics-listen;
requests go to nginx).

Nothing a client sends can wedge it or hold resources: a fixed pool of worker threads (a connection
beyond the pool and its short queue is closed at once), one request per connection, a socket timeout and
a total deadline for reading the request (a watchdog shuts slow connections down), Content-Length
required and at most 64 KiB (411/400/413), a per-source rate limit (429), and a source allow-list (403).
Every error is one line of JSON; nothing is printed as a traceback.

Who may hold a connection is decided when it is accepted, before anything is read, so no caller can starve
the heartbeats of others: one address (an IPv6 one's /64) holds at most PER_SOURCE connections at once, half
the workers, and sources outside the allow-list share OUTSIDE connections of their own (their own threads
too, for the 403), never the pool's. A connection's read deadline starts when a worker takes it.
"""

from __future__ import annotations

import contextlib
import functools
import ipaddress
import json
import logging
import re
import socket
import socketserver
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from http.server import BaseHTTPRequestHandler
from typing import Any

from fdngx.domain import Listen
from fdngx.errors import InventoryError, UsageError, listen_error
from fdngx.registry.core import Registry, answer
from fdngx.registry.rules import DEFAULT_ALLOW, IPAddress, Networks, RateLimit, canonical_ip

log = logging.getLogger("fdngx.registry")
MAX_BODY = 64 * 1024
WORKERS = 8
QUEUE = 32  # connections waiting for a worker; beyond that a new one is closed at once
# One address's connections at once (an IPv6 address's /64: one host holds a whole /64 and could rotate):
# FastDeploy posts one at a time per instance, a post takes milliseconds, and a few instances (data parallel
# ranks) may share a node's address. Beyond it, that address's new connections are closed at once; half the
# workers, so one address never holds them all.
PER_SOURCE = 4
OUTSIDE = 4  # connections at once of all sources outside --registry-allow together, each with its own thread
READ_DEADLINE = 5.0  # s to send the whole request (line, headers, body)
LINGER_SECONDS, LINGER_BYTES = 0.5, 256 * 1024
_LENGTH = re.compile(r"[0-9]{1,7}")


Source = IPAddress | ipaddress.IPv6Network | None  # whose connection budget: conn_key, or None (not allowed)


def conn_key(peer: IPAddress) -> IPAddress | ipaddress.IPv6Network:
    """Whose connection budget a caller draws from: its IPv4 address, or its IPv6 address's /64."""
    return peer if peer.version == 4 else ipaddress.IPv6Network(f"{peer}/64", strict=False)


class _Handler(BaseHTTPRequestHandler):
    registry: Registry
    sources: Networks
    limit: RateLimit
    server: _PoolServer
    protocol_version = "HTTP/1.1"
    timeout = READ_DEADLINE  # socket timeout of every read (StreamRequestHandler.setup)
    error_content_type = "application/json"

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("registry %s: " + fmt, self.client_address[0], *args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, 501 for other methods, 414) as one-line JSON too."""
        self.close_connection = True
        with contextlib.suppress(OSError):
            self._send(*answer(code, message or self.responses.get(code, ("error",))[0]))

    def _send(self, status: int, payload: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.close_connection = True  # one request per connection: no client keeps a worker
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Connection", "close")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _admit(self) -> bool:
        """Source allow-list, then the rate limit; answers and returns False when refused."""
        peer = canonical_ip(self.client_address[0])
        if peer is None or not self.sources.allows(peer):
            self._send(*answer(403, f"{self.client_address[0]} may not use this registry (--registry-allow "
                                    f"{self.sources.text})"))
            return False
        if not self.limit.allow(str(peer)):
            self._send(*answer(429, "too many requests from this address; slow down"), {"Retry-After": "1"})
            return False
        return True

    def _body(self) -> bytes | None:
        """The request body, by a valid Content-Length within MAX_BODY; answers and returns None if not."""
        if self.headers.get("Transfer-Encoding"):
            self._send(*answer(411, "send the body with a Content-Length (no Transfer-Encoding)"))
            return None
        values = self.headers.get_all("Content-Length") or []
        if not values:
            self._send(*answer(411, "Content-Length required"))
            return None
        text = values[0].strip()
        if len(set(v.strip() for v in values)) != 1 or not _LENGTH.fullmatch(text):
            self._send(*answer(400, f"invalid Content-Length {text[:20]!r}: a number of bytes, 0..{MAX_BODY}"))
            return None
        length = int(text)
        if length > MAX_BODY:
            self._send(*answer(413, f"body of {length} bytes is over the {MAX_BODY}-byte limit"))
            return None
        data = self.rfile.read(length) if length else b""
        if len(data) != length:
            self.close_connection = True
            return None  # the client went away or the read deadline passed: nobody to answer
        return data

    def do_POST(self) -> None:
        if not self._admit():
            return
        if self.path.split("?")[0].rstrip("/") != "/register":
            return self._send(*answer(404, f"no POST {self.path[:80]} here; FastDeploy registers at POST /register"))
        raw = self._body()
        if raw is None:
            return
        self.server.read_done(self.request)
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            return self._send(*answer(400, "Invalid InstanceInfo JSON format: the body is not JSON"))
        self._send(*self.registry.register(body, self.client_address[0]))

    def do_GET(self) -> None:
        if not self._admit():
            return
        self.server.read_done(self.request)
        path = self.path.split("?")[0].rstrip("/")
        routes = {"/registered": self.registry.registered, "/registered_number": self.registry.registered_number,
                  "/health_generate": self.registry.health_generate}
        if path in routes:
            try:
                return self._send(200, routes[path]())
            except InventoryError:  # the log names the file; an answer never does
                return self._send(*answer(500, "fdngx could not read the registry's file (the fdngx sidecar's "
                                                "log says why)"))
        if path == "/health":
            return self._send(200, {"code": 200, "msg": "ok"})
        if path == "/metrics":
            return self._send(*answer(404, "fdngx's own metrics are on `fdngx sidecar --metrics-listen`"))
        if path.startswith("/v1/"):
            return self._send(*answer(404, "this is the registry: send requests to nginx"))
        self._send(*answer(404, f"no GET {self.path[:80]} here"))


def _linger(request: socket.socket) -> None:
    """Close like nginx's lingering_close, bounded: after the answer, read (and drop) what the client is
    still sending for a moment, so a refused body (413, 411) does not turn the answer into a reset."""
    with contextlib.suppress(OSError):
        request.shutdown(socket.SHUT_WR)
        request.settimeout(0.2)
        end, left = time.monotonic() + LINGER_SECONDS, LINGER_BYTES
        while left > 0 and time.monotonic() < end and (chunk := request.recv(65536)):
            left -= len(chunk)


class _PoolServer(socketserver.TCPServer):
    """A TCP server whose requests run on a fixed pool; a watchdog bounds how long reading one may take.
    (Not http.server.HTTPServer: its server_bind looks the bind address up in DNS.)"""

    allow_reuse_address = True
    request_queue_size = 128  # listen backlog: a burst of connections is accepted (and judged), not dropped

    def __init__(self, addr: tuple[str, int], handler: type[_Handler], workers: int, queue: int,
                 read_deadline: float, family: int, per_source: int = PER_SOURCE, outside: int = OUTSIDE) -> None:
        self.address_family = family
        self.sources = handler.sources
        # Bound by listen(), once every field is set: a failed bind then closes a whole server (TCPServer's own
        # bind, in __init__, called server_close() before _stop existed: an AttributeError traceback).
        super().__init__(addr, handler, bind_and_activate=False)
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fdngx-registry")
        # Refusals of sources outside the allow-list run here: they never wait for (or hold) a pool worker.
        self.outside_pool = ThreadPoolExecutor(max_workers=outside, thread_name_prefix="fdngx-registry-403")
        self.capacity, self.per_source, self.outside = workers + queue, per_source, outside
        self.slots = threading.BoundedSemaphore(self.capacity)
        self.read_deadline = read_deadline
        self._reading: dict[socket.socket, float] = {}
        self._open: dict[Source, int] = {}  # connections open per allowed address (conn_key); None: all outside
        self._said: dict[str, float] = {}  # when each refusal was last logged
        self._mu = threading.Lock()
        self._stop = threading.Event()
        self.watchdog = threading.Thread(target=self._watch, name="fdngx-registry-watchdog", daemon=True)

    def listen(self) -> None:
        """Bind and listen, then start the watchdog; on OSError everything is closed again."""
        try:
            self.server_bind()
            self.server_activate()
        except OSError:
            self.server_close()
            raise
        self.watchdog.start()

    def process_request(self, request: Any, client_address: Any) -> None:
        peer = canonical_ip(str(client_address[0]))
        source = conn_key(peer) if peer is not None and self.sources.allows(peer) else None  # None: not allowed
        if not self._enter(source, str(client_address[0])):
            self.shutdown_request(request)
            return
        try:
            queued = (self.pool if source is not None else self.outside_pool).submit(self._work, request,
                                                                                     client_address, source)
        except RuntimeError:  # shutting down
            self.read_done(request)
            self.shutdown_request(request)
            self._leave(source)
            return
        queued.add_done_callback(functools.partial(self._unserved, request, source))

    def _unserved(self, request: Any, source: Source, queued: Future[None]) -> None:
        """A connection still waiting for a worker when the server closed (its pool cancels what is queued):
        closed, and its count released, as a served one is."""
        if queued.cancelled():
            self.shutdown_request(request)
            self._leave(source)

    def _enter(self, source: Source, shown: str) -> bool:
        """Count a new connection from `source` in, or refuse it (and say so, once a minute per reason)."""
        with self._mu:
            held = self._open.get(source, 0)
            if source is None and held >= self.outside:
                kind, why = "outside", (f"{held} connections from outside --registry-allow {self.sources.text} "
                                        f"open: closing new ones, from {shown} first")
            elif source is not None and held >= self.per_source:
                kind, why = "source", (f"{shown} has {held} connections open, the most one address may: closing "
                                       "its new ones (other addresses are still served)")
            elif source is not None and not self.slots.acquire(blocking=False):
                kind, why = "busy", f"busy ({self.capacity} connections open): closing new ones, from {shown} first"
            else:
                self._open[source] = held + 1
                return True
            if time.monotonic() - self._said.get(kind, -1e9) <= 60:  # a flood must not flood the log too
                return False
            self._said[kind] = time.monotonic()
        log.warning("registry: %s", why)
        return False

    def _leave(self, source: Source) -> None:
        with self._mu:
            left = self._open[source] - 1
            if left:
                self._open[source] = left
            else:
                del self._open[source]  # the table holds only the addresses with a connection open
            if source is not None:
                self.slots.release()

    def connections(self) -> dict[str, int]:
        """Connections open now, per allowed address ("outside": those of every other source together)."""
        with self._mu:
            return {"outside" if k is None else str(k): n for k, n in self._open.items()}

    def _work(self, request: Any, client_address: Any, source: Source) -> None:
        with self._mu:  # the read deadline runs from here: time queued for a worker is not the client's
            self._reading[request] = time.monotonic()
        try:
            self.finish_request(request, client_address)
        except Exception as exc:  # a client that vanished mid-request: nothing to tell anyone
            log.debug("registry: %s: %s", client_address[0], exc)
        finally:
            self.read_done(request)
            _linger(request)
            self.shutdown_request(request)
            self._leave(source)

    def read_done(self, request: Any) -> None:
        with self._mu:
            self._reading.pop(request, None)

    def _watch(self) -> None:
        while not self._stop.wait(0.2):
            now = time.monotonic()
            with self._mu:
                late = [s for s, t in self._reading.items() if now - t > self.read_deadline]
                for s in late:
                    del self._reading[s]
            for s in late:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.debug("registry: error serving %s", client_address[0])

    def server_close(self) -> None:
        """Safe at any point: unbound, bound, serving, or closed already."""
        self._stop.set()
        super().server_close()
        for pool in (self.pool, self.outside_pool):
            pool.shutdown(wait=False, cancel_futures=True)


def server_options(listen: str, allow: str = DEFAULT_ALLOW) -> tuple[Listen, Networks]:
    """--registry-listen and --registry-allow, checked; UsageError names the option. The sidecar checks them
    before the registry creates its inventory, so a typo leaves no file behind."""
    try:
        where = Listen.parse(listen, "--registry-listen", allow_zero=True)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return where, Networks.parse(allow, "--registry-allow")


class RegistryServer:
    """The HTTP side and the periodic check, each on its own thread (the sidecar runs them beside its loop).

    Bound when made: the sidecar makes it before the Registry, which creates the inventory, so a port that is
    taken leaves no empty inventory behind (ListenError). It serves from start(), with `registry` or the one
    start() is given; stop() also lets go of one that never started."""

    def __init__(self, listen: str, registry: Registry | None = None, *, allow: str = DEFAULT_ALLOW,
                 limit: RateLimit | None = None, workers: int = WORKERS, queue: int = QUEUE,
                 read_deadline: float = READ_DEADLINE, per_source: int = PER_SOURCE, outside: int = OUTSIDE) -> None:
        where, sources = server_options(listen, allow)
        self.handler = type("Handler", (_Handler,), {"sources": sources, "limit": limit or RateLimit(),
                                                      "timeout": read_deadline})
        family = socket.AF_INET6 if ":" in where.bind_host else socket.AF_INET
        self.httpd = _PoolServer((where.bind_host, where.port), self.handler, workers, queue, read_deadline, family,
                                 per_source, outside)
        try:
            self.httpd.listen()
        except OSError as exc:
            raise listen_error("--registry-listen", listen, exc) from None
        self.address = Listen(where.host, self.port)  # the port bound (0: the one the kernel chose)
        self.registry = registry
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.1,), name="fdngx-registry",
                                       daemon=True)
        self.checker = threading.Thread(target=self._check_loop, name="fdngx-registry-check", daemon=True)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    def _check_loop(self) -> None:
        registry = self.registry
        assert registry is not None  # start() sets it before this thread runs
        while not self._stop.wait(registry.settings.check_interval):
            try:
                registry.check()
            except Exception:  # never let the check thread die: it is what removes dead instances
                log.exception("registry: periodic check failed")

    def start(self, registry: Registry | None = None) -> RegistryServer:
        self.registry = registry or self.registry
        if self.registry is None:
            raise ValueError("RegistryServer.start: no Registry to serve")
        self.handler.registry = self.registry
        self.thread.start()
        self.checker.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self.thread.is_alive():  # shutdown() waits for serve_forever: forever if it never ran
            self.httpd.shutdown()
        self.httpd.server_close()
        if self.registry is not None:
            self.registry.close()
