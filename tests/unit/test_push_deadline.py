"""Controller mode: one overall deadline per push (--push-timeout), enforced by shutting the connection down.

requests' timeout is per read: a frontend that answers a status line and then drips a header byte at a time
held its push thread forever (busy and skipped forever, exit waiting on it, a thread and a socket leaked per
remove/re-add). Fake frontends on 127.0.0.1 only; every wait is a condition with a timeout.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from fdngx.domain import Flavor, Listen, ServerState
from fdngx.errors import ApplyError
from fdngx.inventory import load
from fdngx.nginx.admin import Admin
from fdngx.nginx.fanout import Fanout
from fdngx.nginx.pushfile import FrontendSpec
from fdngx.nginx.render import RenderOptions
from fdngx.nginx.target import Target
from tests.support import REPO, RawServer, read_request, token_file, wait_for

Handler = Callable[["FakeFrontend", socket.socket], None]


def answer(conn: socket.socket, request: bytes, status: bytes = b"200 OK", text: bytes | None = None) -> None:
    found = re.search(rb"(?m)^generation ([0-9]+)$", request)
    gen = found.group(1) if found else b"?"
    body = text if text is not None else b"ok generation=" + gen + b" peers=1 added= removed=\n"
    conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: %d\r\n\r\n" % len(body) + body)


class FakeFrontend(RawServer):
    """An admin server on 127.0.0.1 (a RawServer) running `handler` on each connection. Counts the
    connections, the requests and the tokens it got, and sees a client close one (`closed`)."""

    def __init__(self, handler: Handler) -> None:
        self.on_connection = handler
        self.connections = 0
        self._counting = threading.Lock()  # each connection is counted on its own thread
        self.requests: list[bytes] = []
        self.got_request = threading.Event()
        self.closed = threading.Event()
        self.token = b"t" * 32  # what it accepts
        super().__init__(self._connection)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _connection(self, conn: socket.socket) -> None:
        with self._counting:
            self.connections += 1
        conn.settimeout(30)
        self.on_connection(self, conn)


def good(fe: FakeFrontend, conn: socket.socket) -> None:
    """Answers every request as the balancer does, on one kept-alive connection."""
    while request := read_request(conn):
        fe.requests.append(request)
        fe.got_request.set()
        if b"X-Fdngx-Token: " + fe.token + b"\r\n" not in request:
            answer(conn, request, b"403 Forbidden", b"bad or missing X-Fdngx-Token\n")
        else:
            answer(conn, request)


def drip(fe: FakeFrontend, conn: socket.socket) -> None:
    """The status line, then one header byte every 0.05 s (for 30 s at most): until the client closes."""
    fe.requests.append(read_request(conn))
    fe.got_request.set()
    conn.sendall(b"HTTP/1.1 200 OK\r\nX-Slow: ")
    for _ in range(600):
        time.sleep(0.05)
        try:
            conn.sendall(b"a")
        except OSError:
            fe.closed.set()
            return


def in_two_parts(fe: FakeFrontend, conn: socket.socket) -> None:
    """The head after 0.8 s, the body 0.8 s later: every read within a 1 s timeout, the whole not."""
    while request := read_request(conn):
        fe.requests.append(request)
        found = re.search(rb"(?m)^generation ([0-9]+)$", request)
        body = b"ok generation=" + (found.group(1) if found else b"?") + b" peers=1 added= removed=\n"
        time.sleep(0.8)
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
        time.sleep(0.8)
        conn.sendall(body)


@pytest.fixture
def frontends() -> Iterator[Callable[[Handler], FakeFrontend]]:
    made: list[FakeFrontend] = []

    def make(handler: Handler) -> FakeFrontend:
        made.append(FakeFrontend(handler))
        return made[-1]

    yield make
    for fe in made:
        fe.close()


def snapshot(generation: int) -> str:
    return f"generation {generation}\nempty\n"


def test_a_dripping_frontend_is_cut_at_the_deadline_and_its_thread_returns(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path) -> None:
    ok, slow = frontends(good), frontends(drip)
    fan = Fanout([FrontendSpec(f"{fe.url}/fdngx/peers", token_file(tmp_path)) for fe in (ok, slow)], timeout=0.5)
    try:
        t0 = time.monotonic()
        first = fan.push(snapshot(1))
        assert time.monotonic() - t0 < 3.0  # the cycle waits one timeout (generous bound)
        assert [o.status for o in first] == ["ok", "timeout"]
        assert first[1].error is not None and "0.5 s" in first[1].error
        # The push was ended, not left hanging: its connection closed, its thread free, the frontend not busy.
        wait_for(slow.closed.is_set, 5, what="the dripping frontend's connection closed")
        hung = fan._frontends[f"{slow.url}/fdngx/peers"]
        wait_for(lambda: hung.inflight is not None and hung.inflight.done(), 5, what="the push thread returned")
        second = fan.push(snapshot(2))
        assert [o.status for o in second] == ["ok", "timeout"]  # pushed again, not `busy`
        threads = [t for t in threading.enumerate() if t.name.startswith("fdngx-push")]
        assert threads and all(t.daemon for t in threads), "exit must never wait on a push thread"
    finally:
        fan.close()


def test_a_push_is_either_answered_within_the_timeout_or_ended_there(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path) -> None:
    """One number for the cycle's wait and the push's own deadline: a push reported `timeout` does not go on
    to succeed behind the report (it did, when each read had the timeout and the cycle waited 0.25 s more).
    Nor does one that took longer than the timeout count as taken."""
    slow = frontends(in_two_parts)
    fan = Fanout([FrontendSpec(f"{slow.url}/fdngx/peers", token_file(tmp_path))], timeout=1.0)
    try:
        (outcome,) = fan.push(snapshot(1))
        assert outcome.status == "timeout"
        f = fan._frontends[f"{slow.url}/fdngx/peers"]
        wait_for(lambda: f.inflight is not None and f.inflight.done(), 5, what="the push thread returned")
        assert f.inflight is not None and f.inflight.result().status == "failed"
    finally:
        fan.close()


def test_a_frontend_removed_while_its_push_hangs_has_its_connection_closed(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path) -> None:
    slow = frontends(drip)
    fan = Fanout([FrontendSpec(f"{slow.url}/fdngx/peers", token_file(tmp_path))], timeout=30.0)
    cycle: list[object] = []
    pusher = threading.Thread(target=lambda: cycle.append(fan.push(snapshot(1))), daemon=True)
    try:
        pusher.start()
        wait_for(slow.got_request.is_set, 5, what="the push in flight")
        fan.set_frontends([])  # the push file no longer lists it
        wait_for(slow.closed.is_set, 5, what="the removed frontend's connection closed")
        pusher.join(5)
        assert not pusher.is_alive() and cycle, "the cycle still waits on a frontend that is gone"
    finally:
        fan.close()


def test_healthy_frontends_keep_their_connection_across_pushes(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path) -> None:
    ok = frontends(good)
    fan = Fanout([FrontendSpec(f"{ok.url}/fdngx/peers", token_file(tmp_path))], timeout=0.5)
    try:
        for g in range(1, 51):
            assert fan.push(snapshot(g))[0].status == "ok"
        assert ok.connections == 1 and len(ok.requests) == 50
    finally:
        fan.close()


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_the_push_timeout_is_a_finite_number_of_seconds(bad: float, tmp_path: Path) -> None:
    with pytest.raises(Exception, match="push-timeout"):
        Fanout([FrontendSpec("http://127.0.0.1:1/fdngx/peers", token_file(tmp_path))], timeout=bad)


def test_the_per_frontend_sidecars_push_has_one_deadline_too(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path) -> None:
    """The sidecar beside one nginx pushes to its own admin port (no fan-out): whatever listens there dripping
    a byte at a time held the cycle for as long as it dripped (requests' timeout is per read)."""
    slow = frontends(drip)
    port = int(slow.url.rsplit(":", 1)[1])
    inv = load(REPO / "examples" / "fdngx.json")
    admin = Admin(Listen("127.0.0.1", port), "t" * 32, timeout=0.5)
    target = Target(None, RenderOptions(flavor=Flavor.OPENRESTY), None, False, admin)
    states = {i.name: ServerState(10) for i in inv.instances}
    t0 = time.monotonic()
    with pytest.raises(ApplyError, match="ended at its deadline"):
        target.push(inv, states, {})
    assert time.monotonic() - t0 < 5.0  # 0.5 s and a generous bound; the old code waited the whole drip (30 s)
    wait_for(slow.closed.is_set, 5, what="the dripping admin port's connection closed")
    # The next push is not refused by the deadline of the last one.
    ok = frontends(good)
    target = replace(target, admin=Admin(Listen("127.0.0.1", int(ok.url.rsplit(":", 1)[1])), "t" * 32, timeout=0.5))
    for _ in range(3):
        got = target.push(inv, states, {})
        assert got is not None and got.accepted
