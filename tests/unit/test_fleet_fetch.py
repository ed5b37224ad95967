"""The fleet-scale scrape client (fdngx.weights.batch.BatchClient, the sidecar's default): every GET of a
cycle on one thread, with HttpClient's results and bounds. The hostile servers are test_scrape.py's."""

from __future__ import annotations

import math
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from http.server import BaseHTTPRequestHandler

import pytest

from fdngx.domain import Engine, Instance, LoadSample
from fdngx.weights.batch import BatchClient
from fdngx.weights.fetch import HttpClient
from fdngx.weights.scrape import make_client, scrape_all
from tests.unit.test_scrape import FD_PAGE, Behaviour, drip, good, huge, servers, slow

__all__ = ["servers"]  # the fixture, shared with test_scrape.py


def test_the_sidecar_default_is_the_batch_client() -> None:
    client = make_client()
    try:
        assert isinstance(client, BatchClient)
    finally:
        client.close()


@pytest.mark.parametrize(
    ("bad", "needle"),
    [
        (good("\x00\x01garbage { { {\n" * 50), "bad metrics"),
        (good(FD_PAGE.replace("fastdeploy:num_requests_running 3.0", "fastdeploy:num_requests_running NaN")),
         "non-finite"),
        (good("# nothing here\n"), "missing series"),
        (huge, "over"),
        (drip, "deadline"),
        (slow, "read timeout"),
    ],
    ids=["garbage", "nan", "missing", "huge", "drip", "slow"],
)
def test_one_bad_instance_does_not_hurt_the_others(
    servers: Callable[[Behaviour], Instance], bad: Behaviour, needle: str
) -> None:
    insts = [servers(good()), servers(bad), servers(good())]
    client = BatchClient()
    t0 = time.monotonic()
    try:
        got = scrape_all(insts, session=client, timeout=0.5, connect_timeout=0.5, deadline=1.0, max_bytes=256 * 1024)
    finally:
        client.close()
    assert time.monotonic() - t0 < 3.0
    assert got["dp0"].ok and got["dp2"].ok and (got["dp0"].running, got["dp2"].running) == (3.0, 3.0)
    broken = got["dp1"]
    assert not broken.ok and broken.error and needle in broken.error, broken.error
    assert not math.isnan(broken.running)


def test_refused_and_silent_replicas(servers: Callable[[Behaviour], Instance]) -> None:
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(4)
    port = hole.getsockname()[1]
    dead = Instance("dead", "127.0.0.1", 9, 9, Engine.FASTDEPLOY)
    silent = Instance("silent", "127.0.0.1", port, port, Engine.FASTDEPLOY)
    client = BatchClient()
    try:
        got = scrape_all([servers(good()), dead, silent], session=client, timeout=0.3, deadline=1.0)
    finally:
        client.close()
        hole.close()
    assert got["dp0"].ok
    assert got["dead"].error == "connection refused" and got["dead"].health_error == "connection refused"
    assert got["silent"].error == "read timeout" and got["silent"].health_error == "read timeout"


def test_the_same_samples_as_http_client(servers: Callable[[Behaviour], Instance]) -> None:
    insts = [servers(good()), servers(good(health=404)), servers(good("# nothing\n")), servers(chunked),
             servers(http10), servers(interim)]
    out = []
    for client in (HttpClient(), BatchClient()):
        try:
            got = scrape_all(insts, session=client, timeout=0.5, deadline=1.5)
        finally:
            client.close()
        out.append({n: _comparable(s) for n, s in got.items()})
    assert out[0] == out[1]
    assert out[1]["dp3"].running == 3.0 and out[1]["dp4"].running == 3.0 and out[1]["dp5"].running == 3.0


def _comparable(s: LoadSample) -> LoadSample:
    return replace(s, latency=0.0, scraped_at=0.0)


def chunked(h: BaseHTTPRequestHandler) -> None:
    if h.path == "/health":
        h.send_response(200)
        h.send_header("Content-Length", "0")
        h.end_headers()
        return
    h.send_response(200)
    h.send_header("Transfer-Encoding", "chunked")
    h.end_headers()
    body = FD_PAGE.encode()
    for i in range(0, len(body), 97):
        piece = body[i:i + 97]
        h.wfile.write(f"{len(piece):x};ext=1\r\n".encode() + piece + b"\r\n")
        h.wfile.flush()
    h.wfile.write(b"0\r\nX-Trailer: 1\r\n\r\n")


def http10(h: BaseHTTPRequestHandler) -> None:
    """An HTTP/1.0 answer whose body ends with the connection."""
    h.wfile.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\n" + (
        b"" if h.path == "/health" else FD_PAGE.encode()))
    h.close_connection = True


def interim(h: BaseHTTPRequestHandler) -> None:
    """A 100 Continue before the answer."""
    body = b"" if h.path == "/health" else FD_PAGE.encode()
    h.wfile.write(b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: " + str(len(body)).encode()
                  + b"\r\n\r\n" + body)


def test_keep_alive_across_cycles_and_a_server_closing_them(servers: Callable[[Behaviour], Instance]) -> None:
    inst = servers(good())
    client = BatchClient()
    try:
        for _ in range(3):
            assert scrape_all([inst], session=client)["dp0"].ok
        idle = client._raw_idle[("127.0.0.1", inst.port)]
        assert idle, "keep-alive connections are kept for the next cycle"
        for sock in idle:  # the server side drops them (as an idle timeout would)
            sock.shutdown(socket.SHUT_RDWR)
        got = scrape_all([inst], session=client)["dp0"]
        assert got.ok and got.healthy, got
    finally:
        client.close()


def test_host_names_are_looked_up_on_the_pool_and_read_by_the_loop(
        servers: Callable[[Behaviour], Instance]) -> None:
    inst = servers(good())
    named = replace(inst, name="named", host="localhost")
    client = BatchClient()
    try:
        got = scrape_all([inst, named], session=client, deadline=2.0)
    finally:
        client.close()
    assert got["dp0"].ok and got["named"].ok and got["named"].running == 3.0


ODD_ANSWERS = [
    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/1.1 200\r\nContent-Length: 2\r\n\r\nok",  # no reason phrase
    b"HTTP/1.1 0200 OK\r\nContent-Length: 2\r\n\r\nok",  # int() reads it
    b"HTTP/1.1 20 OK\r\nContent-Length: 2\r\n\r\nok",
    b"HTTP/2 200 OK\r\nContent-Length: 2\r\n\r\nok",
    b"ICY 200 OK\r\n\r\nok",
    b"HTTP/1.1\x1c200 OK\r\nContent-Length: 2\r\n\r\nok",  # whitespace to str.split, not to bytes.split
    b"HTTP/1.0 404 Not Found\r\n\r\nmissing",  # the body ends with the connection
    b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort",  # cut short: read1 returns what came
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 200 OK\r\n" + b"X-A: b\r\n" * 101 + b"\r\nok",  # more headers than http.client takes
    b"garbage\r\n\r\n",
    b"",
]


@pytest.mark.parametrize("answer", ODD_ANSWERS, ids=range(len(ODD_ANSWERS)))
def test_odd_answers_read_as_http_client_reads_them(answer: bytes) -> None:
    from fdngx.weights.batch import Job
    from tests.support import RawServer

    def send(conn: socket.socket) -> None:
        conn.recv(4096)
        conn.sendall(answer)

    common = {"connect_timeout": 1.0, "read_timeout": 1.0}
    with RawServer(send) as srv:
        url = f"http://127.0.0.1:{srv.port}/metrics"
        one = HttpClient()
        many = BatchClient()
        try:
            a = one.get(url, max_bytes=1 << 20, deadline=time.monotonic() + 3, **common)
            b = many.get_many([Job("k", url, 1 << 20)], deadline=time.monotonic() + 3, **common)["k"]
        finally:
            one.close()
            many.close()
    assert (b.status, b.body, b.error) == (a.status, a.body, a.error)


def test_a_huge_chunk_counts_against_the_cap_as_it_arrives() -> None:
    """A hostile replica declares one chunk of 17 TB and streams it: the response stops at max_bytes, with the
    buffer bounded by it, instead of buffering the chunk until it is whole (935 MB RSS in one scrape before)."""
    from fdngx.weights.http1 import Response

    resp = Response(max_bytes=2 * 1024 * 1024)
    assert not resp.feed(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nfffffffffff\r\n")
    piece, fed, done = b"x" * 65536, 0, False
    while not done and fed < 64 * 1024 * 1024:
        done = resp.feed(piece)
        fed += len(piece)
    assert done and resp.oversize
    assert fed <= 2 * 1024 * 1024 + len(piece), "stopped as soon as the cap was passed"
