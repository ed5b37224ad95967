"""The sidecar's /metrics server against whoever reaches its port: idle connections from one address cannot
use up the sidecar's threads and open files, and Prometheus from another address is still answered."""

from __future__ import annotations

import errno
import http.client
import os
import socket
import threading

import pytest

from fdngx.errors import ListenError, listen_error
from fdngx.weights import exporter
from fdngx.weights.telemetry import Telemetry
from tests.support import wait_for


def get_metrics(port: int, source: str) -> int:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5, source_address=(source, 0))
    try:
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        assert b"fdngx_build_info" in resp.read()
        return resp.status
    finally:
        conn.close()


@pytest.mark.parametrize("idle", [200])
def test_idle_connections_cannot_use_the_sidecar_up(idle: int) -> None:
    """prometheus_client's server took each connection into a thread with no timeout: ~1,000 idle ones made
    every replica scrape fail with EMFILE (the reviewer's repro); here 200 take at most PER_ADDRESS threads."""
    tel = Telemetry()
    _host, port = tel.serve("127.0.0.1:0")
    socks: list[socket.socket] = []
    before = threading.active_count()
    try:
        for _ in range(idle):
            socks.append(socket.create_connection(("127.0.0.1", port), timeout=5))
        assert get_metrics(port, "127.0.0.2") == 200  # served while the idle ones wait (and so all were accepted)
        assert threading.active_count() - before <= exporter.PER_ADDRESS + 1, "a thread per idle connection"
        # The ones beyond the cap were closed unread: their reads end at once.
        closed = 0
        for s in socks:
            s.settimeout(0.2)
            try:
                closed += s.recv(1) == b""
            except ConnectionResetError:
                closed += 1
            except TimeoutError:
                pass  # one of the few held open, waiting for a request
        assert closed >= idle - exporter.PER_ADDRESS
    finally:
        for s in socks:
            s.close()
        tel.close()


def test_a_silent_connection_is_closed_after_the_read_timeout(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(exporter._Quiet, "timeout", 0.3)
    tel = Telemetry()
    _host, port = tel.serve("127.0.0.1:0")
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.settimeout(5)
        assert wait_for(lambda: s.recv(1) == b"", 5, what="the silent connection closed by the server")
        s.close()
        assert get_metrics(port, "127.0.0.1") == 200  # its slot is free again
    finally:
        tel.close()


@pytest.mark.parametrize(("code", "hint"), [
    (errno.EADDRINUSE, "; another process listens there (ss -ltnp)"),
    (errno.EADDRNOTAVAIL, "; that address is not on this host (yet)"),
    (errno.EINVAL, ""),
])
def test_a_listener_that_cannot_bind_is_exit_1_with_a_hint_by_errno(code: int, hint: str) -> None:
    """A bind that fails is the machine's state (a port taken, an address not up yet at boot): exit 1, which the
    shipped unit restarts, not 2 (a usage error: RestartPreventExitStatus). One line: the option, the address,
    the errno's own words, then where to look."""
    exc = listen_error("--metrics-listen", "10.9.8.7:9100", OSError(code, os.strerror(code)))
    assert isinstance(exc, ListenError) and exc.exit_code == 1
    assert str(exc) == f"--metrics-listen 10.9.8.7:9100: cannot listen: {os.strerror(code)}{hint}"


def test_a_taken_metrics_port_is_a_listen_error() -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ListenError, match=f"^--metrics-listen 127.0.0.1:{port}: cannot listen: "):
            Telemetry().serve(f"127.0.0.1:{port}")
