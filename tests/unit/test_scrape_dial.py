"""Replicas given by host name, sockets the system refuses, and connections to replicas that left: the batch
loop (fdngx.weights.batch, fdngx.weights.dial). Host names are `localhost` only; every server is a tiny one
on 127.0.0.1 (test_scrape_wire's `raw_servers`)."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fdngx.weights.batch import BatchClient
from fdngx.weights.scrape import scrape_all
from tests.support import read_request
from tests.unit.test_scrape_wire import STOP, Handler, answer, good, raw_servers, replica

__all__ = ["raw_servers"]  # the fixture
REPO = Path(__file__).resolve().parents[2]


def silent(conn: socket.socket) -> None:
    """Takes the request, never answers (a busy engine's API loop)."""
    read_request(conn)
    STOP.wait(30)


# -- host names: looked up on the pool, read by the loop ---------------------------------------------------


def test_a_named_replica_dripping_its_head_is_cut_at_the_deadline(raw_servers: Callable[[Handler], int]) -> None:
    """One header byte every 0.1 s, under the read timeout. Before, a host name went through http.client on a
    pool thread, whose timeout is per recv: the thread read on long after its cycle ended, for good. Now the
    loop reads it, and the deadline ends it: the connection is closed when the cycle returns."""
    closed = threading.Event()

    def drip(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        try:
            while not STOP.wait(0.1):
                conn.sendall(b"X")
        except OSError:
            closed.set()

    insts = [replica("drip", raw_servers(drip), "localhost"), replica("ok", raw_servers(good), "localhost")]
    client = BatchClient()
    try:
        got = scrape_all(insts, session=client, deadline=1.0, timeout=0.5)
        assert closed.wait(10.0), "the dripping connection is still being read after the cycle"
        assert got["ok"].ok and got["ok"].healthy, got["ok"]
        assert got["drip"].error == "scrape deadline exceeded", got["drip"]
    finally:
        client.close()


def test_slow_named_replicas_do_not_starve_the_others(raw_servers: Callable[[Handler], int]) -> None:
    """8 named replicas that never answer and 20 that do. Before, named replicas shared 8 pool threads: the
    silent ones held all 8 until their read timeout, and every honest one missed the deadline."""
    insts = [replica(f"silent{i}", raw_servers(silent), "localhost") for i in range(8)]
    insts += [replica(f"ok{i}", raw_servers(good), "localhost") for i in range(20)]
    client = BatchClient()
    try:
        got = scrape_all(insts, session=client, deadline=2.0, timeout=1.5)
    finally:
        client.close()
    honest = {name: s for name, s in got.items() if name.startswith("ok")}
    assert all(s.ok and s.healthy for s in honest.values()), {n: (s.error, s.health_error) for n, s in honest.items()}
    assert all(not got[f"silent{i}"].ok for i in range(8))


def test_a_named_replica_is_asked_with_its_name_and_looked_up_once_per_ttl(
        raw_servers: Callable[[Handler], int], monkeypatch: pytest.MonkeyPatch) -> None:
    from fdngx.weights import dial

    hosts: list[bytes] = []

    def recording(conn: socket.socket) -> None:
        while request := read_request(conn):
            hosts.extend(line for line in request.split(b"\r\n") if line.lower().startswith(b"host:"))
            conn.sendall(answer(request))

    asked: list[str] = []
    real = dial.lookup
    monkeypatch.setattr(dial, "lookup", lambda name: asked.append(name) or real(name))
    port = raw_servers(recording)
    client = BatchClient()
    try:
        for _cycle in range(3):
            got = scrape_all([replica("named", port, "localhost")], session=client)["named"]
            assert got.ok and got.healthy, got
    finally:
        client.close()
    assert set(hosts) == {b"Host: localhost:%d" % port}
    assert asked == ["localhost"], "one lookup serves every GET of the name for its TTL"


def test_each_address_of_a_name_is_tried_in_turn(raw_servers: Callable[[Handler], int],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """As http.client's create_connection: the first address failing (here a family the system has no
    sockets for, EAFNOSUPPORT) moves on to the next; when every one fails, the first failure is told for
    that replica alone."""
    from fdngx.weights import dial

    bogus = (12345, ("nowhere", 0))  # socket.socket(12345, ...) fails at once: nothing is contacted
    monkeypatch.setattr(dial, "lookup", lambda name: [bogus, (socket.AF_INET, ("127.0.0.1", 0))])
    port = raw_servers(good)
    got = scrape_all([replica("named", port, "localhost")])
    assert got["named"].ok and got["named"].healthy, got["named"]
    monkeypatch.setattr(dial, "lookup", lambda name: [bogus])
    got = scrape_all([replica("named", port, "localhost"), replica("ip", port)])
    assert got["ip"].ok, got["ip"]
    assert got["named"].error is not None and "Address family not supported" in got["named"].error, got


def test_a_lookup_that_hangs_costs_only_its_replicas_and_never_the_deadline(
        raw_servers: Callable[[Handler], int], monkeypatch: pytest.MonkeyPatch) -> None:
    from fdngx.weights import dial

    release = threading.Event()
    real = dial.lookup

    def slow_lookup(name: str) -> list[tuple[int, tuple[object, ...]]]:
        release.wait(30)
        return real(name)

    monkeypatch.setattr(dial, "lookup", slow_lookup)
    port = raw_servers(good)
    client = BatchClient()
    try:
        start = time.monotonic()
        got = scrape_all([replica("named", port, "localhost"), replica("ip", port)], session=client, deadline=0.5)
        assert time.monotonic() - start < 5.0  # the deadline, not the lookup (which waits 30 s)
        assert got["ip"].ok
        assert got["named"].error == "no answer before the scrape deadline", got["named"]
        release.set()
        deadline = time.monotonic() + 10
        while not (named := scrape_all([replica("named", port, "localhost")], session=client)["named"]).ok:
            assert time.monotonic() < deadline, named  # the lookup's answer is used as soon as it is in
    finally:
        release.set()
        client.close()


# -- connections to replicas that left --------------------------------------------------------------------


def test_connections_to_replicas_that_left_the_inventory_are_closed(raw_servers: Callable[[Handler], int]) -> None:
    """5 rollouts of 20 replicas on new addresses left 200 idle sockets open for good. Now a cycle closes the
    kept-alive connections of addresses it does not ask."""
    changed = threading.Condition()
    conns = {"opened": 0, "closed": 0}

    def tracked(conn: socket.socket) -> None:
        with changed:
            conns["opened"] += 1
        try:
            good(conn)  # returns when the client closes
        finally:
            with changed:
                conns["closed"] += 1
                changed.notify_all()

    old = [replica(f"old{i}", raw_servers(tracked)) for i in range(3)]
    new = [replica(f"new{i}", raw_servers(good)) for i in range(3)]
    client = BatchClient()
    try:
        for _cycle in range(2):
            assert all(s.ok for s in scrape_all(old, session=client).values())
        assert {("127.0.0.1", i.port) for i in old} <= set(client._raw_idle)
        assert all(s.ok for s in scrape_all(new, session=client).values())
        assert not {("127.0.0.1", i.port) for i in old} & set(client._raw_idle)
        with changed:
            assert changed.wait_for(lambda: conns["closed"] == conns["opened"] > 0, timeout=10.0), conns
        assert {("127.0.0.1", i.port) for i in new} <= set(client._raw_idle), "the current ones are kept"
    finally:
        client.close()


# -- sockets the system refuses -------------------------------------------------------------------------------

CHILD = """
import json, os, resource, sys, time
from fdngx.weights.batch import BatchClient, Job
ports, spare, hard_too = json.loads(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
client = BatchClient()
jobs = [Job(i, f"http://127.0.0.1:{p}/health", 65536, True) for i, p in enumerate(ports)]
limit = len(os.listdir("/proc/self/fd")) + spare
hard = limit if hard_too else resource.getrlimit(resource.RLIMIT_NOFILE)[1]
resource.setrlimit(resource.RLIMIT_NOFILE, (limit, hard))
try:
    got = client.get_many(jobs, connect_timeout=5.0, read_timeout=5.0, deadline=time.monotonic() + 20)
    out = {"errors": [got[j.key].error if j.key in got else "missing" for j in jobs],
           "soft": resource.getrlimit(resource.RLIMIT_NOFILE)[0], "hard": hard, "limit": limit}
except BaseException as exc:
    out = {"raised": f"{type(exc).__name__}: {exc}"}
print(json.dumps(out))
"""


def _child(ports: list[int], spare: int, hard_too: bool) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(ports), str(spare), "1" if hard_too else "0"],
                          capture_output=True, text=True, cwd=REPO, timeout=60)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def test_a_soft_open_files_limit_short_for_the_fleet_is_raised_for_it(raw_servers: Callable[[Handler], int]) -> None:
    """A fleet grown past the limit the sidecar set at start (for the inventory of then): before, the
    EMFILE of the first socket over it escaped and failed every cycle. get_many lifts the soft limit for its
    number of GETs."""
    ports = [raw_servers(good) for _ in range(60)]
    got = _child(ports, spare=8, hard_too=False)
    assert "raised" not in got, got
    assert got["errors"] == [None] * 60, got
    assert isinstance(got["soft"], int) and isinstance(got["hard"], int)
    assert got["soft"] >= min(got["hard"], 2 * 60 + 256), got  # the sidecar's 4 per instance + 256, per GET


def test_a_socket_the_system_refuses_fails_that_get_only(raw_servers: Callable[[Handler], int]) -> None:
    """The hard limit short too (nothing to lift): the GETs past it fail with EMFILE, the others are read; the
    cycle is not lost."""
    ports = [raw_servers(good) for _ in range(40)]
    got = _child(ports, spare=12, hard_too=True)
    assert "raised" not in got, got
    errors = got["errors"]
    assert isinstance(errors, list) and "missing" not in errors, got
    assert errors.count(None) >= 3, got
    refused = [e for e in errors if e is not None]
    assert refused and all("Too many open files" in e for e in refused), got


def test_http_client_gets_end_at_their_deadline_however_the_server_drips(
        raw_servers: Callable[[Handler], int]) -> None:
    """HttpClient (fdngx.weights.fetch) is out of the scrape cycle but still serves one-off GETs (the
    registry's probes): its deadline holds too, not only each recv's timeout."""
    from fdngx.weights.fetch import Fetch, HttpClient

    def drip(conn: socket.socket) -> None:
        read_request(conn)
        conn.sendall(b"HTTP/1.1 200 OK\r\n")
        while not STOP.wait(0.1):
            conn.sendall(b"X")

    port = raw_servers(drip)
    client = HttpClient()
    got: list[Fetch] = []
    worker = threading.Thread(target=lambda: got.append(client.get(
        f"http://127.0.0.1:{port}/health", connect_timeout=1.0, read_timeout=0.5, deadline=time.monotonic() + 1.0,
        max_bytes=65536)), daemon=True)
    try:
        worker.start()
        worker.join(10.0)
        assert got, "the GET is still reading long after its deadline"
        assert got[0].error == "scrape deadline exceeded", got
    finally:
        client.close()
