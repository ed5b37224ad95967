"""A frontend's 200 counts only as the balancer says it (`ok` or `unchanged`, the generation sent echoed);
whatever else answers on the admin port is an error, said on one bounded line. 127.0.0.1 only."""

from __future__ import annotations

import socket
from collections.abc import Callable
from pathlib import Path

import pytest

from fdngx.errors import ApplyError
from fdngx.nginx.admin import Admin
from fdngx.nginx.fanout import Fanout
from fdngx.nginx.pushfile import FrontendSpec
from tests.support import read_request, token_file
from tests.unit.test_push_deadline import FakeFrontend, Handler, answer, frontends

__all__ = ["frontends"]  # the fixture

FORGED = b"2099-01-01 00:00:00 WARNING fdngx.fanout http://10.0.0.9:9401/fdngx/peers: push works again (7 peers)"


def answering(status: bytes, text: bytes) -> Handler:
    def handler(fe: FakeFrontend, conn: socket.socket) -> None:
        while request := read_request(conn):
            answer(conn, request, status, text)
    return handler


@pytest.mark.parametrize(("status", "text", "said"), [
    (b"200 OK", b"banana generation=1700000000000 peers=3\n", "unexpected answer 'banana generation="),
    (b"200 OK", b"ok generation=1 peers=3 added= removed=\n", "unexpected answer 'ok generation=1 peers=3"),
    (b"200 OK", b"ok peers=3\n", "unexpected answer 'ok peers=3'"),
    (b"500 Internal Server Error", b"boom\n" + FORGED + b"\n", "HTTP 500 boom"),  # FdngxError joins lines too
    (b"500 Internal Server Error", b"boom\r\x1b[2Jcleared", "HTTP 500 boom \\x1b[2Jcleared"),
])
def test_an_answer_not_the_balancers_is_a_failure_on_one_line(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path, status: bytes, text: bytes, said: str) -> None:
    fe = frontends(answering(status, text))
    fan = Fanout([FrontendSpec(f"{fe.url}/fdngx/peers", token_file(tmp_path))])
    try:
        (outcome,) = fan.push("generation 1700000000000\nempty\n")
        assert outcome.status == "failed" and not outcome.accepted
        assert outcome.error is not None and said in outcome.error, outcome.error
        assert outcome.error.isprintable() and len(outcome.error) < 400
    finally:
        fan.close()


def test_the_balancers_answers_are_taken(frontends: Callable[[Handler], FakeFrontend]) -> None:
    fe = frontends(answering(b"200 OK", b"unchanged generation=1700000000000 peers=2\n"))
    admin = Admin.from_url(fe.url, "t" * 32)
    try:
        got = admin.push("generation 1700000000000\nempty\n")
        assert (got.status, got.generation, got.peers) == ("unchanged", 1700000000000, 2)
        with pytest.raises(ApplyError, match="unexpected answer"):
            admin.push("generation 1700000000001\nempty\n")  # the balancer echoes the generation it got
    finally:
        admin.close()


def test_a_frontend_of_another_upstream_is_a_failure_said_with_its_message(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path) -> None:
    """Its 409 is not "stale" (another controller's newer snapshot, an answer): before, it was read as stale or as
    an unexpected answer; now the frontend's own words, as a failure of that frontend."""
    said = b"snapshot for upstream fleet; this frontend's pool is modelB (nothing applied): does the push file ...\n"
    fe = frontends(answering(b"409 Conflict", said))
    fan = Fanout([FrontendSpec(f"{fe.url}/fdngx/peers", token_file(tmp_path))])
    try:
        (outcome,) = fan.push("generation 1700000000000\nupstream fleet\nempty\n")
        assert outcome.status == "failed" and not outcome.answered
        assert outcome.error is not None
        assert "HTTP 409 snapshot for upstream fleet; this frontend's pool is modelB" in outcome.error, outcome.error
        assert outcome.url == f"{fe.url}/fdngx/peers"
    finally:
        fan.close()


@pytest.mark.parametrize("line", ["upstream fleet", "frontends 4"])
def test_a_frontend_too_old_for_a_newer_line_is_told_to_be_upgraded_first(
        frontends: Callable[[Handler], FakeFrontend], tmp_path: Path, line: str) -> None:
    fe = frontends(answering(b"400 Bad Request", f'line 3: unknown line "{line}" (nothing applied)\n'.encode()))
    fan = Fanout([FrontendSpec(f"{fe.url}/fdngx/peers", token_file(tmp_path))])
    try:
        (outcome,) = fan.push(f"# fdngx peers\ngeneration 1700000000000\n{line}\nempty\n")
        assert outcome.status == "failed" and outcome.error is not None
        assert f'HTTP 400 line 3: unknown line "{line}"' in outcome.error
        word = line.split()[0]
        assert f"runs an fdngx older than this controller's, which cannot take the {word} line" in outcome.error
        assert "upgrade the frontends first" in outcome.error and outcome.error.isprintable()
    finally:
        fan.close()
