"""The sidecar's own /metrics server (prometheus_client's WSGI app), bounded against whoever reaches the port.

prometheus_client's start_http_server takes every connection into a thread of its own and waits on it with no
timeout: ~1,000 idle connections (anyone who reaches --metrics-listen: a container network's peers with the
gateway's 0.0.0.0) used the sidecar's open files up, and every scrape of the replicas failed with EMFILE.
Here a connection's every read has READ_TIMEOUT_S, one address holds at most PER_ADDRESS connections and all
of them together at most TOTAL (more are closed at once, unread): Prometheus (one connection per scrape)
keeps getting its answer, and the sidecar's descriptors and threads stay bounded whatever arrives.
"""

from __future__ import annotations

import socket
import threading
from collections import Counter
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

READ_TIMEOUT_S = 5.0
PER_ADDRESS = 4
TOTAL = 32


class _Quiet(WSGIRequestHandler):
    timeout = READ_TIMEOUT_S  # socketserver.StreamRequestHandler: settimeout on the connection

    def log_message(self, format: str, *args: Any) -> None:
        """One line per scrape on stderr would drown the sidecar's own log."""


class _Server(WSGIServer):
    daemon_threads = True  # a connection in progress never holds up exit
    block_on_close = False
    request_queue_size = 128  # socketserver's 5: a burst of connections waited for SYN retries (1 s, 3 s, ...)

    def __init__(self, *args: Any, **kw: Any) -> None:
        self._mu = threading.Lock()
        self._open: Counter[str] = Counter()
        super().__init__(*args, **kw)

    def process_request(self, request: Any, client_address: Any) -> None:
        who = str(client_address[0])
        with self._mu:
            full = self._open[who] >= PER_ADDRESS or self._open.total() >= TOTAL
            if not full:
                self._open[who] += 1
        if full:
            self.shutdown_request(request)  # closed unread: its slot is someone else's
            return
        try:
            threading.Thread(target=self._serve, args=(request, client_address, who), daemon=True).start()
        except RuntimeError:  # no thread to be had: this connection goes, the next may get one
            self._done(who)
            self.shutdown_request(request)

    def _serve(self, request: Any, client_address: Any, who: str) -> None:
        try:
            self.finish_request(request, client_address)
        except Exception:  # a broken client: its connection ends, nothing else does
            pass
        finally:
            self.shutdown_request(request)
            self._done(who)

    def _done(self, who: str) -> None:
        with self._mu:
            self._open[who] -= 1
            if self._open[who] <= 0:
                del self._open[who]


def serve(host: str, port: int, registry: CollectorRegistry) -> tuple[WSGIServer, threading.Thread]:
    """Serve `registry` on host:port (0: any free port) from a daemon thread; raises OSError if it cannot."""

    class Server(_Server):
        address_family = socket.AF_INET6 if ":" in host else socket.AF_INET

    httpd = make_server(host, port, make_wsgi_app(registry), Server, handler_class=_Quiet)
    thread = threading.Thread(target=httpd.serve_forever, name="fdngx-metrics", daemon=True)
    thread.start()
    return httpd, thread
