"""Issue 10's registry attacks (`fdngx sidecar --registry-listen`), each against the real HTTP server.

The server runs in-process on 127.0.0.1 with a fake probe: fdngx contacts no registered address here.
Each test says what today's main did; every one of them failed there (see the issue).
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fdngx import inventory as inv_mod
from fdngx.registry.core import Registry, RegistrySettings
from fdngx.registry.http import MAX_BODY, RegistryServer
from fdngx.registry.rules import NameCache, RateLimit
from tests.support import HealthyProbe

BODY = {"role": "mixed", "host_ip": "10.0.0.7", "port": 8001, "metrics_port": 9001, "transfer_protocol": ["ipc"]}


def make_registry(tmp: Path, others: tuple[Path, ...] = ()) -> Registry:
    return Registry(tmp / "fdngx.json", others, settings=RegistrySettings.from_options(30), probe=HealthyProbe(),
                    names=NameCache(lambda name: []))


@contextlib.contextmanager
def serving(tmp: Path, **kw: Any) -> Iterator[tuple[RegistryServer, Registry]]:
    reg = kw.pop("registry", None) or make_registry(tmp)
    server = RegistryServer("127.0.0.1:0", reg, **kw).start()
    try:
        yield server, reg
    finally:
        server.stop()


def raw(port: int, data: bytes, timeout: float = 5.0, hold: float = 0.0) -> tuple[int, dict[str, Any], bytes]:
    """Send bytes as they are; return (status, JSON body, raw response)."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        with contextlib.suppress(OSError):  # the server may answer (and stop reading) before it has all
            s.sendall(data)
        if hold:
            time.sleep(hold)
        chunks = []
        with contextlib.suppress(OSError):
            while chunk := s.recv(65536):
                chunks.append(chunk)
    resp = b"".join(chunks)
    if not resp:
        return 0, {}, resp
    head, _, body = resp.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body) if body else {}, resp


def post(port: int, body: bytes, headers: str = "") -> tuple[int, dict[str, Any], bytes]:
    return raw(port, f"POST /register HTTP/1.1\r\nHost: r\r\n{headers}\r\n".encode() + body)


def one_line_json(resp: bytes) -> None:
    body = resp.partition(b"\r\n\r\n")[2]
    assert b"\n" not in body and b"Traceback" not in resp and json.loads(body)["msg"]


@pytest.mark.parametrize(("header", "status"), [
    ("Content-Length: -1\r\n", 400), ("Content-Length: abc\r\n", 400), ("Content-Length: 1e3\r\n", 400),
    ("Content-Length: +12\r\n", 400), ("Content-Length: 12\r\nContent-Length: 13\r\n", 400),
    ("", 411), ("Transfer-Encoding: chunked\r\n", 411), (f"Content-Length: {MAX_BODY + 1}\r\n", 413),
    ("Content-Length: 99999999999\r\n", 400),
])
def test_content_length_must_be_a_number_within_64_kib(tmp_path: Path, header: str, status: int,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Was: `-1` read the whole stream (300 MiB, +310 MB RSS); non-numeric printed a traceback."""
    with serving(tmp_path) as (server, _reg):
        started = time.monotonic()
        got, doc, resp = post(server.port, b"x" * (128 << 10), header)  # 128 KiB behind the headers: not read
        assert got == status and doc["code"] == status, resp[:300]
        assert time.monotonic() - started < 3
        one_line_json(resp)
    assert "Traceback" not in capsys.readouterr().err


def test_a_body_at_the_limit_is_read_and_judged(tmp_path: Path) -> None:
    with serving(tmp_path) as (server, reg):
        body = json.dumps({**BODY, "pad": "x" * (MAX_BODY - 200)}).encode()
        assert len(body) <= MAX_BODY
        got, doc, _ = post(server.port, body, f"Content-Length: {len(body)}\r\n")
        assert (got, doc) == (200, {"code": 200, "msg": "Register success"})
        assert len(inv_mod.load(reg.path).instances) == 1


@pytest.mark.parametrize("body", [b"{", b"[" * 32000 + b"]" * 32000, b"\xff\xfe", b"null", b"[]"])
def test_bad_json_is_400_never_a_traceback(tmp_path: Path, body: bytes, capsys: pytest.CaptureFixture[str]) -> None:
    with serving(tmp_path) as (server, reg):
        got, _doc, resp = post(server.port, body, f"Content-Length: {len(body)}\r\n")
        assert got == 400
        one_line_json(resp)
        assert inv_mod.load(reg.path).instances == []
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("lone", [b'"2.5\\ud800"', b'"2.5\xed\xa0\x80"'])  # an escape; the same in raw bytes
def test_a_lone_surrogate_is_400_and_never_reaches_the_file(tmp_path: Path, lone: bytes) -> None:
    """Was: 200, and the surrogate stored (json.loads decodes both forms to one): an inventory holding
    "\\ud800", which no UTF-8 text can carry and strict JSON readers refuse."""
    with serving(tmp_path) as (server, reg):
        before = reg.path.read_bytes()
        body = json.dumps(BODY)[:-1].encode() + b', "version": ' + lone + b"}"
        got, doc, resp = post(server.port, body, f"Content-Length: {len(body)}\r\n")
        assert got == 400 and "invalid version" in doc["msg"] and "surrogate" in doc["msg"], doc
        one_line_json(resp)
        assert reg.path.read_bytes() == before


def test_http_servers_own_errors_are_json_too(tmp_path: Path) -> None:
    with serving(tmp_path) as (server, _reg):
        got, _, resp = raw(server.port, b"PUT /register HTTP/1.1\r\nHost: r\r\nContent-Length: 0\r\n\r\n")
        assert got == 501
        one_line_json(resp)
        got, _, resp = raw(server.port, b"GET /registered HTTP/1.1\r\nX: " + b"a" * 70000 + b"\r\n\r\n")
        assert got == 431
        one_line_json(resp)
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:  # HTTP/0.9: no status line
            s.sendall(b"GARBAGE\r\n\r\n")
            assert json.loads(s.recv(4096))["code"] == 400
        got, doc, _ = raw(server.port, b"GET /v1/chat/completions HTTP/1.1\r\nHost: r\r\n\r\n")
        assert got == 404 and "nginx" in doc["msg"]


def test_slow_clients_cannot_hold_workers_or_threads(tmp_path: Path) -> None:
    """Was: each slow client held a thread forever. Now: a fixed pool, a read deadline, excess closed."""
    with serving(tmp_path, workers=4, queue=4, read_deadline=1.0) as (server, _reg):
        threads_before = threading.active_count()
        idle = []
        for _ in range(40):
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            s.sendall(b"POST /register HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n{")  # then nothing
            idle.append(s)
        try:
            time.sleep(0.3)
            assert threading.active_count() <= threads_before + 4
            # Within the read deadline every slow connection is closed and a real client is served.
            body = json.dumps(BODY).encode()
            deadline = time.monotonic() + 5
            while True:
                try:
                    got = post(server.port, body, f"Content-Length: {len(body)}\r\n")[0]
                except OSError:
                    got = 0
                if got == 200 or time.monotonic() > deadline:
                    break
                time.sleep(0.1)
            assert got == 200
            for s in idle:
                s.settimeout(3)
                with contextlib.suppress(OSError):
                    while s.recv(4096):
                        pass  # the server closed it (EOF), or answered and closed
        finally:
            for s in idle:
                s.close()
        assert threading.active_count() <= threads_before + 4


def test_a_client_dripping_its_headers_is_cut_at_the_deadline(tmp_path: Path) -> None:
    with serving(tmp_path, read_deadline=1.0) as (server, _reg):
        s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
        started = time.monotonic()
        closed = False
        with contextlib.suppress(OSError):
            s.sendall(b"POST /register HTTP/1.1\r\n")
            for _ in range(40):
                s.sendall(b"X-Drip: 1\r\n")
                time.sleep(0.1)
        with contextlib.suppress(OSError):
            s.settimeout(3)
            closed = s.recv(100) == b""
        s.close()
        assert time.monotonic() - started < 4.5
        assert closed or time.monotonic() - started < 4.5


def test_rate_limit_per_source_is_429(tmp_path: Path) -> None:
    with serving(tmp_path, limit=RateLimit(rate=0.01, burst=3)) as (server, _reg):
        statuses = [raw(server.port, b"GET /registered_number HTTP/1.1\r\nHost: r\r\n\r\n")[0] for _ in range(5)]
        assert statuses == [200, 200, 200, 429, 429]


def test_sources_outside_the_allow_list_are_403(tmp_path: Path) -> None:
    """Was: anyone who reached the port could register any address."""
    with serving(tmp_path, allow="10.0.0.0/8") as (server, reg):
        body = json.dumps(BODY).encode()
        got, doc, _ = post(server.port, body, f"Content-Length: {len(body)}\r\n")
        assert got == 403 and "--registry-allow" in doc["msg"]
        assert inv_mod.load(reg.path).instances == []


def test_link_local_and_unresolvable_names_are_refused_over_http(tmp_path: Path) -> None:
    """Was: link-local (169.254.169.254) registered and scraped; a name that does not resolve made every
    later `nginx -t` fail."""
    with serving(tmp_path) as (server, reg):
        for host, needle in (("169.254.169.254", "link-local"), ("nowhere.invalid", "does not resolve")):
            body = json.dumps({**BODY, "host_ip": host}).encode()
            got, doc, _ = post(server.port, body, f"Content-Length: {len(body)}\r\n")
            assert got == 400 and needle in doc["msg"]
        assert inv_mod.load(reg.path).instances == []


def test_an_address_of_another_file_is_409_and_the_merge_still_loads(tmp_path: Path) -> None:
    """Was: "Register success", then every reload refused and a restarted sidecar exited 1."""
    other = tmp_path / "node2.json"
    other.write_text(json.dumps({"version": 1, "instances": [{"name": "dp0", "host": "10.0.0.7", "port": 8001}]}))
    with serving(tmp_path, registry=make_registry(tmp_path, (other,))) as (server, reg):
        body = json.dumps(BODY).encode()
        got, doc, _ = post(server.port, body, f"Content-Length: {len(body)}\r\n")
        assert got == 409 and "'dp0'" in doc["msg"] and "node2.json" not in doc["msg"]  # no server path
        inv_mod.load_many([reg.path, other])


def test_a_full_registry_answers_507_in_one_line_and_heartbeats_still_pass(tmp_path: Path) -> None:
    """H3 (outside review): with --registry-max-instances reached, a NEW instance gets 507 Insufficient
    Storage as one line of JSON; a registered one's heartbeat still gets 200."""
    reg = Registry(tmp_path / "fdngx.json", settings=RegistrySettings.from_options(30, max_instances=1),
                   probe=HealthyProbe(), names=NameCache(lambda name: []))
    with serving(tmp_path, registry=reg) as (server, reg):
        for port, status in ((8001, 200), (8002, 507), (8001, 200)):
            body = json.dumps({**BODY, "port": port}).encode()
            got, doc, resp = post(server.port, body, f"Content-Length: {len(body)}\r\n")
            assert got == status, resp[:300]
            one_line_json(resp)
            if status == 507:
                assert resp.startswith(b"HTTP/1.1 507 Insufficient Storage\r\n")
                assert "--registry-max-instances 1" in doc["msg"]
        assert [i.port for i in inv_mod.load(reg.path).instances] == [8001]


def test_targets_peer_takes_the_callers_address_from_the_connection(tmp_path: Path) -> None:
    """--registry-targets peer: the caller here is 127.0.0.1; it may register itself, not 10.0.0.7."""
    reg = Registry(tmp_path / "fdngx.json", settings=RegistrySettings.from_options(30, "peer"), probe=HealthyProbe(),
                   names=NameCache(lambda name: []))
    with serving(tmp_path, registry=reg) as (server, reg):
        for host, status in (("10.0.0.7", 403), ("127.0.0.1", 200)):
            body = json.dumps({**BODY, "host_ip": host}).encode()
            got, _doc, resp = post(server.port, body, f"Content-Length: {len(body)}\r\n")
            assert got == status, resp[:300]
            one_line_json(resp)
        assert [i.host for i in inv_mod.load(reg.path).instances] == ["127.0.0.1"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10, 70000) | st.floats(allow_nan=True) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)
bodies = st.fixed_dictionaries({}, optional={
    "role": json_values | st.sampled_from(["mixed", "MIXED", 0, 1, "decode"]),
    "host_ip": json_values | st.sampled_from(["10.0.0.7", "127.0.0.1", "fe80::1", "x;y", "::ffff:10.0.0.8"]),
    "port": json_values | st.sampled_from([8001, "8002", 0]),
    "metrics_port": json_values | st.sampled_from([9001, "0", None]),
    "transfer_protocol": json_values, "device_ids": json_values, "rdma_ports": json_values,
    "connector_port": json_values, "engine_worker_queue_port": json_values,
}) | json_values


@settings(max_examples=150, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(body=bodies)
def test_any_registration_is_answered_and_keeps_every_file_loadable(tmp_path: Path, body: Any) -> None:
    """Property: whatever the body, the answer is 200/400/403/409/503 with {code, msg}, never a raise or a
    500, and the registry's file merged with the others still loads (nginx config stays renderable)."""
    other = tmp_path / "node2.json"
    if not other.exists():
        other.write_text(json.dumps({"version": 1, "instances": [{"name": "dp0", "host": "10.0.0.8", "port": 8001}]}))
    reg = make_registry(tmp_path, (other,))
    status, doc = reg.register(body, "10.0.0.7")
    assert status in (200, 400, 403, 409, 503) and doc["code"] == status and isinstance(doc["msg"], str)
    merged = inv_mod.load_many([reg.path, other])
    assert all(i.host in ("10.0.0.7", "10.0.0.8", "127.0.0.1") for i in merged.instances)
