"""What one replica may put on the wire (fdngx.weights.http1 and the batch loop, fdngx.weights.batch): interim
answers, chunk framing, trailers, and whatever makes reading its answer fail, stay with that replica's GET.
The replicas are tiny raw-socket servers on 127.0.0.1 (`raw_servers`)."""

from __future__ import annotations

import http.client
import io
import logging
import socket
import threading
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdngx.domain import Engine, Instance
from fdngx.weights import http1
from fdngx.weights.batch import BatchClient
from fdngx.weights.http1 import Refused, Response
from fdngx.weights.scrape import scrape_all
from tests.support import RawServer, read_request
from tests.unit.test_scrape import FD_PAGE

Handler = Callable[[socket.socket], None]
STOP = threading.Event()


def answer(request: bytes) -> bytes:
    body = FD_PAGE.encode() if b" /metrics " in request.split(b"\r\n", 1)[0] else b""
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body) + body


def good(conn: socket.socket) -> None:
    """An honest replica: keep-alive, the FastDeploy page at /metrics, 200 at /health."""
    while request := read_request(conn):
        conn.sendall(answer(request))


@pytest.fixture
def raw_servers() -> Iterator[Callable[[Handler], int]]:
    """Start a server on 127.0.0.1 running `handler` on each connection (a thread each); returns its port."""
    STOP.clear()
    servers: list[RawServer] = []

    def start(handler: Handler) -> int:
        servers.append(RawServer(handler))
        return servers[-1].port

    yield start
    STOP.set()
    for srv in servers:
        srv.close()


def replica(name: str, port: int, host: str = "127.0.0.1") -> Instance:
    return Instance(name, host, port, port, Engine.FASTDEPLOY)


# -- interim (1xx) answers ----------------------------------------------------------------------------------


def test_thousands_of_interim_answers_in_one_send_fail_that_replica_only(
        raw_servers: Callable[[Handler], int]) -> None:
    """5,000 `100 Continue` in one send: before, each was skipped by a recursive call and the RecursionError
    escaped the batch loop, so every cycle failed and the weights froze. Now that replica's GETs are refused,
    the others are read, and the next cycle is read as well."""
    def flood(conn: socket.socket) -> None:
        while read_request(conn):
            conn.sendall(b"HTTP/1.1 100 Continue\r\n\r\n" * 5000)

    insts = [replica("a", raw_servers(good)), replica("flood", raw_servers(flood)), replica("b", raw_servers(good))]
    client = BatchClient()
    try:
        for _cycle in range(2):
            got = scrape_all(insts, session=client, deadline=3.0)
            assert got["a"].ok and got["b"].ok, got
            bad = got["flood"]
            assert not bad.ok and not bad.healthy
            assert bad.error is not None and "interim" in bad.error, bad.error
            assert bad.health_error is not None and "interim" in bad.health_error, bad.health_error
    finally:
        client.close()


FINAL = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


@pytest.mark.parametrize("interim", [
    b"HTTP/1.1 103 Early Hints\r\nTransfer-Encoding: chunked\r\nLink: </a.css>\r\n\r\n",
    b"HTTP/1.1 100 Continue\r\nContent-Length: 5\r\n\r\n",
], ids=["103-chunked", "100-length"])
def test_an_interim_answers_framing_does_not_carry_over(interim: bytes) -> None:
    """Each head is read afresh: before, a 103 saying `Transfer-Encoding: chunked` made the 200 after it,
    with its Content-Length, read as chunked (refused: "bad chunk size"), and a 100's Content-Length stood
    for an HTTP/1.0 answer that has none."""
    resp = Response(1 << 20)
    assert resp.feed(interim + FINAL)
    assert (resp.status, resp.body(), resp.oversize) == (200, b"ok", False)
    http10 = Response(1 << 20)
    assert not http10.feed(interim + b"HTTP/1.0 200 OK\r\n\r\nthe whole body")
    assert http10.eof() and http10.body() == b"the whole body"


def test_interim_answers_are_capped() -> None:
    cap = http1.MAX_INTERIM
    ok = Response(1 << 20)
    assert ok.feed(b"HTTP/1.1 100 Continue\r\n\r\n" * cap + FINAL) and ok.body() == b"ok"
    with pytest.raises(Refused, match="interim"):
        Response(1 << 20).feed(b"HTTP/1.1 100 Continue\r\n\r\n" * (cap + 1) + FINAL)


INTERIM_HEAD = st.builds(
    lambda status, headers: b"HTTP/1.1 %d X\r\n" % status + b"".join(headers) + b"\r\n",
    st.integers(100, 199),
    st.lists(st.sampled_from([b"Transfer-Encoding: chunked\r\n", b"Content-Length: 7\r\n", b"Content-Length: 0\r\n",
                              b"Connection: close\r\n", b"Link: </x>\r\n"]), max_size=3))
FINAL_ANSWER = st.sampled_from([
    FINAL,
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n\r\n",
    b"HTTP/1.1 204 No Content\r\n\r\n",
    b"HTTP/1.1 404 Not Found\r\nContent-Length: 4\r\n\r\nnope",
])


def feed_in_pieces(resp: Response, wire: bytes, cuts: list[int]) -> tuple[bool, int]:
    """Feed `wire` cut at `cuts`; (done, bytes fed when done or at the end)."""
    fed = 0
    for a, b in zip([0, *sorted(cuts)], [*sorted(cuts), len(wire)], strict=True):
        fed = b
        if resp.feed(wire[a:b]):
            return True, fed
    return False, fed


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.lists(INTERIM_HEAD, max_size=6), FINAL_ANSWER, st.lists(st.integers(0, 400), max_size=8))
def test_property_interim_answers_change_nothing(heads: list[bytes], final: bytes, cuts: list[int]) -> None:
    """Any interim answers, with any framing headers, in any recv pieces: the answer read is the final one."""
    wire = b"".join(heads) + final
    alone, mixed = Response(1 << 20), Response(1 << 20)
    assert alone.feed(final)
    done, fed = feed_in_pieces(mixed, wire, [c for c in cuts if c < len(wire)])
    assert done and fed == len(wire)
    assert (mixed.status, mixed.body(), mixed.will_close) == (alone.status, alone.body(), alone.will_close)


# -- chunk framing and trailers count against the cap -------------------------------------------------------

CHUNKED = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"


@pytest.mark.parametrize("stream", [b"1\r\na\r\n" * 10_000, b"X-Trailer: 1\r\n" * 5_000],
                         ids=["1-byte-chunks", "endless-trailers"])
def test_chunk_framing_and_trailers_count_against_the_cap(stream: bytes) -> None:
    """Before, only chunk data counted: 1-byte chunks up to a 2 MB cap were 12.6 MB on the wire (1.8 s of the
    one scrape thread's CPU), and trailers never counted nor ended. Now every byte on the wire does."""
    cap = 64 * 1024
    resp = Response(cap)
    assert not resp.feed(CHUNKED + (b"0\r\n" if b"Trailer" in stream else b""))
    done, fed = False, 0
    while not done and fed < 64 * cap:
        done = resp.feed(stream)
        fed += len(stream)
    assert done and resp.oversize
    assert fed <= cap + len(stream), "stopped at the first recv past the cap"


def chunked_wire(body: bytes, sizes: list[int], ext: bytes, trailers: list[bytes]) -> bytes:
    out, at = [], 0
    for size in sizes:
        piece = body[at:at + size]
        if not piece:
            break
        out.append(b"%x%s\r\n%s\r\n" % (len(piece), ext, piece))
        at += len(piece)
    if at < len(body):
        out.append(b"%X\r\n%s\r\n" % (len(body) - at, body[at:]))
    return b"".join(out) + b"0\r\n" + b"".join(t + b"\r\n" for t in trailers) + b"\r\n"


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=3000), st.lists(st.integers(1, 700), max_size=20), st.sampled_from([b"", b";a=b", b" "]),
       st.lists(st.sampled_from([b"X-A: 1", b"Y: " + b"z" * 100]), max_size=4), st.integers(1, 4000),
       st.lists(st.integers(0, 6000), max_size=10))
def test_property_a_chunked_body_reads_as_http_client_reads_it_within_the_cap(
        body: bytes, sizes: list[int], ext: bytes, trailers: list[bytes], cap: int, cuts: list[int]) -> None:
    """Any chunking of any body, any recv pieces: when its bytes on the wire (after the head) fit the cap,
    the body is http.client's reading of it, complete exactly at its last byte; else the answer is oversize,
    no later than the recv that passed the cap."""
    framed = chunked_wire(body, sizes, ext, trailers)
    wire = CHUNKED + framed
    resp = Response(cap)
    done, fed = feed_in_pieces(resp, wire, [c for c in cuts if c < len(wire)])
    assert done
    if len(framed) <= cap:
        assert not resp.oversize and fed == len(wire)
        reference = http.client.HTTPResponse(_Wire(wire))  # type: ignore[arg-type]
        reference.begin()
        assert resp.body() == reference.read() == body
    else:
        assert resp.oversize
        ends = [*sorted(c for c in cuts if c < len(wire)), len(wire)]
        assert fed == next(end for end in ends if end - len(CHUNKED) > cap), "the recv that passed the cap ends it"


class _Wire:
    def __init__(self, data: bytes) -> None:
        self.data = data

    def makefile(self, mode: str) -> io.BytesIO:
        return io.BytesIO(self.data)


def test_a_negative_chunk_size_is_refused() -> None:
    """int() reads `-2` in base 16; a negative size once stood for "trailers next" (-2) or "size line" (-1)."""
    for size in (b"-2", b"-1", b"-5;x=y"):
        with pytest.raises(Refused, match="bad chunk size"):
            Response(1 << 20).feed(CHUNKED + size + b"\r\nabcde\r\n0\r\n\r\n")


# -- no per-request failure ends the cycle ------------------------------------------------------------------


def test_an_unexpected_exception_reading_one_answer_fails_that_get_only(
        raw_servers: Callable[[Handler], int], monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """A bug in reading one replica's answer (an exception the loop does not expect, as the RecursionError
    was): that GET fails with the exception's name, the others are read, one WARNING names the replica's
    address however many cycles it recurs."""
    def marked(conn: socket.socket) -> None:
        while request := read_request(conn):
            conn.sendall(answer(request).replace(b"\r\n", b"\r\nX-Trip: 1\r\n", 1))

    real = Response.feed

    def feed(self: Response, data: bytes) -> bool:
        if b"X-Trip: 1" in data:
            raise LookupError("a bug in one answer's reading")
        return real(self, data)

    monkeypatch.setattr(Response, "feed", feed)
    bad_port = raw_servers(marked)
    insts = [replica("a", raw_servers(good)), replica("bad", bad_port), replica("b", raw_servers(good))]
    client = BatchClient()
    caplog.set_level(logging.WARNING, logger="fdngx")
    try:
        for _cycle in range(3):
            got = scrape_all(insts, session=client, deadline=3.0)
            assert got["a"].ok and got["b"].ok, got
            assert got["bad"].error == "LookupError" and got["bad"].health_error == "LookupError", got["bad"]
    finally:
        client.close()
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert f"127.0.0.1 port {bad_port}" in warned[0] and "LookupError" in warned[0], warned
