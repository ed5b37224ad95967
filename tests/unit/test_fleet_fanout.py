"""Controller mode's pieces without nginx: admin URLs, push files, tokens, the admin allow-list, and the
fan-out against tiny HTTP servers (one answers, one refuses, one never answers)."""

from __future__ import annotations

import http.server
import logging
import re
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdngx import inventory as inv_mod
from fdngx.errors import UsageError
from fdngx.nginx.admin import parse_admin_url
from fdngx.nginx.fanout import Fanout, PushOutcome
from fdngx.nginx.pushfile import FrontendSpec, frontend_specs, read_push_file
from fdngx.nginx.render import LOOPBACK_ALLOW, RenderOptions, admin_allow_list, render
from fdngx.sim.process import free_ports
from fdngx.weights.controller import fleet_outcome
from tests.support import token_file

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("url", ["http://10.0.0.5:9401", "http://10.0.0.5:9401/fdngx/peers", "http://[fd00::5]:9401",
                                 "http://fe1.example.com:9401/"])
def test_admin_urls(url: str) -> None:
    listen, path = parse_admin_url(url)
    assert listen.port == 9401 and path == "/fdngx/peers"


@pytest.mark.parametrize("url", ["https://10.0.0.5:9401", "http://10.0.0.5", "http://10.0.0.5:9401/other",
                                 "http://u:p@10.0.0.5:9401", "http://10.0.0.5:9401/?x=1", "10.0.0.5:9401",
                                 "http://10.0.0.5:99999", "http://bad host:9401", "http://a;b:9401"])
def test_bad_admin_urls_are_refused(url: str) -> None:
    with pytest.raises(ValueError, match="admin URL"):
        parse_admin_url(url)


def test_push_file_lines_tokens_and_errors(tmp_path: Path) -> None:
    shared, own = token_file(tmp_path), token_file(tmp_path, "own")
    f = tmp_path / "frontends"
    f.write_text(f"# the frontends\nhttp://10.0.0.1:9401\n\nhttp://10.0.0.2:9401/fdngx/peers  {own}  # own token\n")
    specs = read_push_file(f, shared)
    assert specs == [FrontendSpec("http://10.0.0.1:9401/fdngx/peers", shared),
                     FrontendSpec("http://10.0.0.2:9401/fdngx/peers", own)]
    assert [s.label for s in specs] == ["10.0.0.1:9401", "10.0.0.2:9401"]
    with pytest.raises(UsageError, match="no token file"):
        read_push_file(f, None)
    f.write_text("http://10.0.0.1:9401\nhttp://10.0.0.1:9401/fdngx/peers\n")
    with pytest.raises(UsageError, match="twice"):
        read_push_file(f, shared)
    f.write_text("http://10.0.0.1:9401\nftp://x:1\n")
    with pytest.raises(UsageError, match=r"frontends:2"):
        read_push_file(f, shared)
    assert frontend_specs(["http://10.0.0.3:9401"], shared)[0].token_file == shared


def test_tokens_must_be_private_and_long_enough(tmp_path: Path) -> None:
    spec = FrontendSpec("http://127.0.0.1:1/fdngx/peers", token_file(tmp_path, "short", "abc"))
    with pytest.raises(UsageError, match="shorter"):
        Fanout([spec])
    loose = token_file(tmp_path, "loose")
    loose.chmod(0o644)
    with pytest.raises(Exception, match="readable or writable by group or others"):
        Fanout([FrontendSpec(spec.url, loose)])
    with pytest.raises(Exception, match="cannot read"):
        Fanout([FrontendSpec(spec.url, tmp_path / "missing")])


def test_admin_allow_list_renders_nginx_allow_lines() -> None:
    assert admin_allow_list("loopback") == LOOPBACK_ALLOW
    assert admin_allow_list("10.0.0.0/8, 192.168.1.7,fd00::/8,loopback") == (
        "10.0.0.0/8", "192.168.1.7", "fd00::/8", "127.0.0.1", "::1")
    assert admin_allow_list("10.1.2.3/8") == ("10.0.0.0/8",)
    for bad in ("all", "10.0.0.0/33", "evil; deny", "", "0x7f000001 "):
        with pytest.raises(UsageError, match="admin-allow"):
            admin_allow_list(bad)
    inv = inv_mod.load(REPO / "examples" / "fdngx.json")
    base = RenderOptions(mode="site", flavor="openresty", admin_token_file="/etc/fdngx/t", admin_listen="0.0.0.0:9401")
    default = render(inv, base)
    admin = "        deny all;\n        client_max_body_size 4m;"  # the admin location's, not /fdngx/generation's
    assert f"allow 127.0.0.1;\n        allow ::1;\n{admin}" in default
    wide = render(inv, RenderOptions(**{**base.__dict__, "admin_allow": "10.0.0.0/8"}))
    assert f"location = /fdngx/peers {{\n        allow 10.0.0.0/8;\n{admin}" in wide


class _Admin(http.server.BaseHTTPRequestHandler):
    """Answers as the balancer does: {generation} is the pushed one."""

    answer = (200, "ok generation={generation} peers=3 added= removed=")
    protocol_version = "HTTP/1.1"  # keep-alive, as nginx

    def do_POST(self) -> None:
        pushed = self.rfile.read(int(self.headers.get("Content-Length", 0))).decode()
        found = re.search(r"^generation ([0-9]+)$", pushed, re.M)
        status, text = self.answer
        body = text.replace("{generation}", found.group(1) if found else "?").encode()
        self.send_response(status)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def servers() -> Iterator[tuple[str, str, str, str]]:
    """(answers 200, answers 409, refuses connections, accepts and never answers)"""
    ok = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Admin)

    class Stale(_Admin):
        answer = (409, "stale generation=5 current=9 (nothing applied)")

    stale = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Stale)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(8)
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in (ok, stale)]
    for t in threads:
        t.start()
    try:
        yield (f"http://127.0.0.1:{ok.server_port}", f"http://127.0.0.1:{stale.server_port}",
               f"http://127.0.0.1:{free_ports(1)[0]}", f"http://127.0.0.1:{hole.getsockname()[1]}")
    finally:
        for s in (ok, stale):
            s.shutdown()
            s.server_close()
        hole.close()


def test_fanout_one_dead_or_silent_frontend_never_holds_the_others(
    servers: tuple[str, str, str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ok, stale, dead, silent = servers
    fan = Fanout(frontend_specs([ok, stale, dead, silent], token_file(tmp_path)), timeout=0.3)
    caplog.set_level(logging.INFO, "fdngx.fanout")
    try:
        t0 = time.monotonic()
        first = {o.frontend: o for o in fan.push("generation 5\n")}
        took = time.monotonic() - t0
        assert took < 1.0, took  # one timeout at most, not one per frontend
        ok_l, stale_l, dead_l, silent_l = (u.split("//")[1] for u in (ok, stale, dead, silent))
        assert first[ok_l].status == "ok" and first[ok_l].peers == 3 and first[ok_l].seconds < 0.25
        assert first[stale_l].status == "stale" and first[stale_l].current == 9 and first[stale_l].answered
        assert first[dead_l].status == "failed" and first[dead_l].error == "refused the connection"
        assert first[silent_l].status in ("timeout", "failed") and first[silent_l].seconds < 0.6
        for _ in range(3):
            again = {o.frontend: o.status for o in fan.push("generation 6\n")}
            assert again[ok_l] == "ok" and again[dead_l] == "failed"
            assert again[silent_l] in ("timeout", "busy", "failed")
        failures = [r.getMessage() for r in caplog.records if "push failed" in r.getMessage()]
        assert len([m for m in failures if dead_l in m]) == 1, failures  # once per transition, not per cycle
        assert len([r for r in caplog.records if "holds generation" in r.getMessage()]) == 1
    finally:
        fan.close()


def test_the_cycle_fails_only_when_no_frontend_answered() -> None:
    ok, stale = PushOutcome("a:1", "ok", peers=4), PushOutcome("b:1", "stale", current=9)
    bad = PushOutcome("c:1", "failed", error="connection refused")
    assert fleet_outcome((ok, bad)) == (4, None)
    assert fleet_outcome((stale, bad)) == (0, None)  # another controller is ahead: not an error
    peers, error = fleet_outcome((bad, PushOutcome("d:1", "timeout", error="no answer within 0.5 s")))
    assert peers is None and error is not None and "c:1: connection refused" in error
    assert fleet_outcome(None) == (None, None)  # no controller-mode push this cycle


def test_a_squatter_on_the_admin_port_gets_the_token_once_and_no_redirect_is_followed() -> None:
    """Whatever listens on the admin port (nginx stopped, another user bound it) may answer 307 elsewhere:
    fdngx must not follow it (requests keeps custom headers, the token included, across redirects), nor read
    an endless answer; both are errors naming the admin URL."""
    from fdngx.errors import ApplyError
    from fdngx.nginx.admin import MAX_ANSWER, Admin

    hits: list[str | None] = []

    class Target(_Admin):
        def do_POST(self) -> None:
            hits.append(self.headers.get("X-Fdngx-Token"))
            super().do_POST()

    target = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Target)

    class Redirect(_Admin):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{target.server_port}/fdngx/peers")
            self.send_header("Content-Length", "0")
            self.end_headers()

    class Endless(_Admin):
        answer = (200, "x" * (MAX_ANSWER + 10))

    servers = [target, http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirect),
               http.server.ThreadingHTTPServer(("127.0.0.1", 0), Endless)]
    for s in servers:
        threading.Thread(target=s.serve_forever, daemon=True).start()
    try:
        redirect = Admin.from_url(f"http://127.0.0.1:{servers[1].server_port}", "secret-token")
        with pytest.raises(ApplyError, match=r"openresty admin http://127\.0\.0\.1:\d+/fdngx/peers: HTTP 307"):
            redirect.push('{"generation": 1}')
        assert hits == [], "the redirect was followed with the token"
        endless = Admin.from_url(f"http://127.0.0.1:{servers[2].server_port}", "secret-token")
        with pytest.raises(ApplyError, match="answer over"):
            endless.push('{"generation": 1}')
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()
