"""FastDeploy instances register themselves with `--router`: the sidecar's /register feeds nginx.

The replica is the simulator (`fdngx.sim`, a separate metrics port, as `multi_api_server --metrics-ports`
starts FastDeploy) and its registration is FastDeploy's own loop and body, reconstructed in
tests/fixtures/fastdeploy_register.py from `fastdeploy/engine/register_manager.py` and `fastdeploy/config.py`
(see that file for the commits). Only 127.0.0.1; every process is stopped by PID.

The last tests run the registry's HTTP server in-process (no nginx) on 127.0.0.1, port 0, with a fake /health
probe: raw sockets that hold connections open against its per-source and outside-the-allow-list budgets. One
runs the registry with its real /health probe against in-process keep-alive servers on 127.0.0.1.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import select
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fdngx.errors import ListenError
from fdngx.nginx.openresty import lua_modules
from fdngx.registry.core import Registry, RegistrySettings, instance_name
from fdngx.registry.http import OUTSIDE, PER_SOURCE, QUEUE, WORKERS, RegistryServer
from fdngx.registry.probe import HttpProbe
from fdngx.registry.rules import NameCache
from fdngx.sim.process import start_sim
from tests.support import (
    Backends,
    HealthyProbe,
    Nginx,
    RawServer,
    fdngx,
    free_ports,
    read_request,
    stop_process_group,
    wait_for,
    write_inventory,
)

FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "fastdeploy_register.py"
INTERVAL = 2.0  # the register loop's sleep (FastDeploy: 5 s), shortened for the test
GRACE = 5.0  # --registry-grace: 2.5 intervals
CHECK = min(5.0, max(0.5, GRACE / 4))  # the registry's check period under that grace


def no_proxy_env() -> dict[str, str]:
    """The fixture uses requests as FastDeploy does (proxies from the environment): none for loopback."""
    return {k: v for k, v in os.environ.items() if "proxy" not in k.lower()}


def start_register_loop(api_port: int, router: str, *extra: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, str(FIXTURE), "--port", str(api_port), "--router", router, "--host", "127.0.0.1",
         "--interval", str(INTERVAL), *extra],
        start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=no_proxy_env(),
    )


def sidecar_metric(port: int, name: str, replica: str) -> float | None:
    text = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=2).text
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels.get("replica") == replica:
                return float(s.value)
    return None


def completion(listen: int) -> requests.Response:
    with requests.Session() as s:
        s.trust_env = False
        return s.post(f"http://127.0.0.1:{listen}/v1/completions", json={"prompt": "x", "max_tokens": 1}, timeout=10)


def served_by(listen: int, n: int = 12) -> set[str]:
    return {str(completion(listen).headers.get("X-Fdngx-Replica")) for _ in range(n)}


@pytest.mark.nginx
def test_fastdeploy_register_loop_end_to_end(tmp_path: Path) -> None:
    """Issue 11's Done-when: a replica started the way FastDeploy starts it (separate metrics port, the exact
    register loop and body of register_manager.py / config.py @ acfda944, no metrics_port) registers with
    fdngx, gets a load signal through --registry-metrics-port, takes traffic through nginx within one
    interval. Its heartbeats stop: while its /health passes it stays (one WARNING); once /health fails too it
    leaves; the next heartbeat adds it back."""
    api, met, static, reg_port, listen, own_metrics = free_ports(6)
    own = tmp_path / "registered.json"  # does not exist yet: the registry creates it
    # A second -i file (another node's, or hand-written): nginx has a server before any registration.
    others = write_inventory(tmp_path / "static.json", [
        {"name": "static", "host": "127.0.0.1", "port": static, "metrics_port": static}])
    conf = tmp_path / "nginx" / "nginx.conf"
    log = tmp_path / "sidecar.log"
    router = f"127.0.0.1:{reg_port}"  # no scheme: FastDeploy's RouterConfig adds http://
    name = instance_name("127.0.0.1", api)
    procs: list[subprocess.Popen[bytes]] = []
    nginx: Nginx | None = None
    with Backends([static], ["static"]), start_sim([api], [met], log_path=tmp_path / "sim.log") as sim:
        try:
            with log.open("wb") as fh:
                procs.append(subprocess.Popen(
                    [sys.executable, "-m", "fdngx", "sidecar", "-i", str(own), "-i", str(others), "--out", str(conf),
                     "--mode", "standalone", "--listen", f"127.0.0.1:{listen}", "--interval", "0.5",
                     "--debounce", "0.2", "--metrics-listen", f"127.0.0.1:{own_metrics}",
                     "--registry-listen", router, "--registry-grace", str(GRACE),
                     "--registry-metrics-port", f"{met - api:+d}",
                     # A removal waits for a reload slot (60/N s after the last membership change: 15 s by
                     # default, tests/unit/test_membership_pace.py); here one a second, so it leaves at once.
                     "--max-reloads-per-minute", "60"],
                    start_new_session=True, stdout=fh, stderr=subprocess.STDOUT,
                ))
            url = f"http://{router}"
            wait_for(lambda: conf.exists() and f"127.0.0.1:{static}" in conf.read_text(), 30,
                     what=f"the first config ({log.read_text(errors='replace')[-400:]})")
            nginx = Nginx(conf.parent).start(f"http://127.0.0.1:{listen}/health")
            assert served_by(listen, 4) == {"static"}

            started = time.monotonic()
            procs.append(start_register_loop(api, router))
            wait_for(lambda: served_by(listen, 8) >= {str(api)}, INTERVAL, interval=0.1,
                     what="the registered replica serving through nginx within one interval")
            took = time.monotonic() - started
            assert took <= INTERVAL, took

            doc = requests.get(f"{url}/registered", timeout=5).json()
            assert set(doc) == {"code", "msg", "prefill", "decode", "mixed"} and doc["prefill"] == doc["decode"] == []
            mine = [e for e in doc["mixed"] if e["url"] == f"http://127.0.0.1:{api}"]
            assert mine and mine[0]["metrics_port"] == str(met) and mine[0]["metrics_source"] == "rule", doc
            assert requests.get(f"{url}/registered_number", timeout=5).json() == {"mixed": 2, "prefill": 0, "decode": 0}
            [inst] = json.loads(own.read_text())["instances"]
            assert (inst["metrics_port"], inst["metrics_source"], inst["registered"]) == (met, "rule", True)
            # The load signal: the sidecar scrapes the metrics port the rule gave.
            wait_for(lambda: sidecar_metric(own_metrics, "fdngx_replica_load_signal", name) == 1, 10,
                     what="a load signal for the registered replica")
            assert sim.state(0)["healthy"]

            # Heartbeats stop while it serves (/health passes): kept, said once (health.go removes only on a
            # failed /health check).
            stop_process_group(procs.pop())
            kept = "has sent no heartbeat for"
            wait_for(lambda: kept in log.read_text(errors="replace"), GRACE + CHECK + 5, interval=0.1,
                     what="the WARNING that a silent replica whose /health passes is kept")
            assert f"127.0.0.1:{api}" in conf.read_text() and len(json.loads(own.read_text())["instances"]) == 1
            # Its /health fails too: it leaves at the next check (+ one apply).
            sim.fault(0, unhealthy=True)
            failed = time.monotonic()
            wait_for(lambda: f"127.0.0.1:{api}" not in conf.read_text(), CHECK + 5, interval=0.1,
                     what="the silent, unhealthy replica leaving the config")
            assert time.monotonic() - failed <= CHECK + 3
            assert requests.get(f"{url}/registered_number", timeout=5).json()["mixed"] == 1
            assert json.loads(own.read_text())["instances"] == []
            text = log.read_text(errors="replace")
            assert "no heartbeat for" in text and "/health not passing" in text and text.count(kept) == 1

            # FastDeploy keeps posting while it lives: the next heartbeat adds it back.
            sim.fault(0, unhealthy=False)
            procs.append(start_register_loop(api, router))
            wait_for(lambda: served_by(listen, 8) >= {str(api)}, 10, interval=0.1, what="the replica back")
        finally:
            for p in reversed(procs):
                stop_process_group(p)
            if nginx is not None:
                nginx.stop()


@pytest.mark.nginx
def test_registry_answers_like_fastdeploys_router(tmp_path: Path) -> None:
    """golang_router register.go: 200 {"code":200,"msg":"Register success"}; 503 when the instance's own
    /health is not 200 (the simulator's "unhealthy" fault: 404 "Worker Service Not Healthy", as
    api_server.py); 400 with the reason for a bad body; prefill refused; /health_generate exists."""
    api, met, reg_port, listen = free_ports(4)
    inv = tmp_path / "fdngx.json"
    conf = tmp_path / "nginx" / "nginx.conf"
    with start_sim([api], [met], log_path=tmp_path / "sim.log") as sim:
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--out", str(conf), "--mode", "standalone",
             "--listen", str(listen), "--interval", "0.5", "--debounce", "0.2", "--metrics-listen", "off",
             "--registry-listen", f"127.0.0.1:{reg_port}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{reg_port}"
            wait_for(lambda: requests.get(f"{url}/registered_number", timeout=1).json()["mixed"] == 0, 20,
                     what="registry up")
            # config.py @ 0009064e (develop) sends metrics_port and tp_size, ports as ints; the Go router
            # also takes them as strings.
            body = {"role": "MIXED", "host_ip": "127.0.0.1", "port": str(api), "metrics_port": str(met),
                    "tp_size": 1, "transfer_protocol": ["ipc"], "device_ids": [0]}
            sim.fault(0, unhealthy=True)
            r = requests.post(f"{url}/register", json=body, timeout=10)
            assert r.status_code == 503 and r.json()["code"] == 503 and "not healthy" in r.json()["msg"]
            assert not json.loads(inv.read_text())["instances"]
            sim.fault(0, unhealthy=False)
            r = requests.post(f"{url}/register", json=body, timeout=10)
            assert (r.status_code, r.json()) == (200, {"code": 200, "msg": "Register success"})
            wait_for(lambda: conf.exists() and f"server 127.0.0.1:{api} " in conf.read_text(), 20,
                     what="the registered replica in the rendered config")
            [inst] = json.loads(inv.read_text())["instances"]
            assert (inst["metrics_port"], inst["metrics_source"]) == (met, "body")
            bad = requests.post(f"{url}/register", json={"role": "mixed", "host_ip": "x y", "port": 1}, timeout=5)
            assert bad.status_code == 400 and "invalid host_ip" in bad.json()["msg"]
            pd = requests.post(f"{url}/register", json={**body, "role": 1, "port": api + 1}, timeout=5)
            assert pd.status_code == 400 and "only MIXED" in pd.json()["msg"] and "splitwise" in pd.json()["msg"]
            hg = requests.get(f"{url}/health_generate", timeout=5).json()
            assert (hg["code"], hg["msg"]) == (200, "Health check complete")
        finally:
            stop_process_group(sidecar)


def test_fdngx_own_listeners_are_never_registered(tmp_path: Path) -> None:
    """nginx's --listen, the registry's and the metrics' ports answer /health 200 too: registered (an outside
    review), nginx's own port stopped every apply (nginx would proxy to itself; a replica registered after it
    never took a request and the fleet went 502 once the last good one died), the others put 404s and 405s in
    rotation. Each is refused with a 400 naming the option, before any /health probe; a real replica is not."""
    api, met, reg_port, listen, own_metrics = free_ports(5)
    inv = tmp_path / "fdngx.json"
    conf = tmp_path / "nginx" / "nginx.conf"
    with start_sim([api], [met], log_path=tmp_path / "sim.log"):
        sidecar = subprocess.Popen(
            [sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--out", str(conf), "--mode", "standalone",
             "--listen", f"0.0.0.0:{listen}", "--interval", "0.5", "--debounce", "0.2",
             "--metrics-listen", f"127.0.0.1:{own_metrics}", "--registry-listen", f"127.0.0.1:{reg_port}"],
            start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        )
        try:
            url = f"http://127.0.0.1:{reg_port}"
            wait_for(lambda: requests.get(f"{url}/registered_number", timeout=1).json()["mixed"] == 0, 20,
                     what="registry up")
            for port, option in ((listen, "--listen"), (reg_port, "--registry-listen"),
                                 (own_metrics, "--metrics-listen")):
                r = requests.post(f"{url}/register", json={"role": "mixed", "host_ip": "127.0.0.1", "port": port},
                                  timeout=10)
                assert r.status_code == 400, (option, r.text)
                assert f"127.0.0.1:{port} is fdngx's own {option}" in r.json()["msg"], r.text
            r = requests.post(f"{url}/register", json={"role": "mixed", "host_ip": "127.0.0.1", "port": api,
                                                       "metrics_port": met}, timeout=10)
            assert r.status_code == 200, r.text
            wait_for(lambda: conf.exists() and f"server 127.0.0.1:{api} " in conf.read_text(), 20,
                     what="the real replica in the rendered config")
            assert [i["port"] for i in json.loads(inv.read_text())["instances"]] == [api]
        finally:
            stop_process_group(sidecar)


def test_an_instance_an_older_fdngx_registered_at_an_own_listener_is_dropped_at_start(tmp_path: Path) -> None:
    """Registered before the refusal existed, it stayed for good: its heartbeats got 400, its /health (nginx's
    own) passed, so the grace kept it, and every apply failed on it (a review of the refusal)."""
    from fdngx.domain import Listen

    own_port, real = free_ports(2)
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": "fd-own", "host": "127.0.0.1", "port": own_port, "registered": True},
        {"name": "fd-real", "host": "127.0.0.1", "port": real, "registered": True}])
    settings = RegistrySettings(own=(("--listen", Listen("0.0.0.0", own_port)),))
    Registry(inv, settings=settings, probe=HealthyProbe(), names=NameCache(lambda name: []))
    assert [i["name"] for i in json.loads(inv.read_text())["instances"]] == ["fd-real"]


def test_an_own_listener_is_matched_by_address_and_wildcard() -> None:
    """A wildcard --listen takes the port on every local address; a named one only its own address."""
    from fdngx.domain import Listen

    wild = RegistrySettings(own=(("--listen", Listen("0.0.0.0", 18080)),))
    assert "fdngx's own --listen 0.0.0.0:18080" in (wild.own_listener("127.0.0.2", 18080) or "")
    assert wild.own_listener("127.0.0.1", 18081) is None
    named = RegistrySettings(own=(("--metrics-listen", Listen("127.0.0.1", 18400)),))
    assert named.own_listener("127.0.0.1", 18400) is not None
    assert named.own_listener("127.0.0.2", 18400) is None, "another loopback address is another socket"


@pytest.mark.nginx
@pytest.mark.parametrize("openresty", [
    False, pytest.param(True, marks=pytest.mark.skipif(not lua_modules(None), reason="needs libnginx-mod-http-lua"))])
def test_an_empty_fleet_starts_and_answers_503_until_an_instance_registers(tmp_path: Path, openresty: bool) -> None:
    """A gateway whose replicas all come from registrations (docker/gateway.sh with --registry-listen): the
    first config has no replica yet. It renders (one placeholder server held down; the Lua balancer: a snapshot
    with no peer), nginx starts and answers an OpenAI error 503 with Retry-After; the first registration then
    serves through that same nginx within one interval (openresty: pushed, no reload)."""
    api, met, reg_port, listen, admin = free_ports(5)
    own = tmp_path / "registered.json"  # does not exist: the registry creates it, empty
    conf = tmp_path / "nginx" / "nginx.conf"
    router = f"127.0.0.1:{reg_port}"
    flavor = ("--flavor", "openresty", "--admin-listen", f"127.0.0.1:{admin}") if openresty else ()
    args = ("sidecar", "-i", str(own), "--out", str(conf), "--mode", "standalone", "--listen", f"127.0.0.1:{listen}",
            "--registry-listen", router, "--registry-metrics-port", f"{met - api:+d}", "--registry-grace", str(GRACE),
            # the last instance leaves at once, not after the membership pace (15 s by default; unit-tested)
            "--max-reloads-per-minute", "60", *flavor)
    first = fdngx(*args, "--once", timeout=60)
    assert first.returncode == 0 and conf.exists(), first.stderr
    assert json.loads(own.read_text())["instances"] == []
    procs: list[subprocess.Popen[bytes]] = []
    nginx = Nginx(conf.parent).start(f"http://127.0.0.1:{listen}/health")
    try:
        workers = nginx.worker_pids()
        r = completion(listen)
        assert r.status_code == 503 and r.headers.get("Retry-After") == "1", (r.status_code, r.text)
        assert r.json()["error"]["code"] == "service_unavailable", r.text
        assert r.headers.get("X-Fdngx-Replica") is None  # nginx's own answer: no replica named

        log = tmp_path / "sidecar.log"
        with log.open("wb") as fh:
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "fdngx", *args, "--interval", "0.5", "--debounce", "0.2",
                 "--metrics-listen", "off"],
                start_new_session=True, stdout=fh, stderr=subprocess.STDOUT))
        with start_sim([api], [met], log_path=tmp_path / "sim.log") as sim:
            wait_for(lambda: "no instance yet: nginx answers 503" in log.read_text(errors="replace"), 30,
                     what=f"the sidecar saying it waits for registrations ({log.read_text(errors='replace')[-300:]})")
            procs.append(start_register_loop(api, router))
            wait_for(lambda: served_by(listen, 4) == {str(api)}, 10, interval=0.1,
                     what=f"the registered replica serving ({log.read_text(errors='replace')[-400:]})")
            # Its heartbeats stop and its /health fails: the fleet is empty again (openresty: a snapshot that says
            # `empty`), 503 again.
            stop_process_group(procs.pop())
            sim.fault(0, unhealthy=True)
            wait_for(lambda: json.loads(own.read_text())["instances"] == [], GRACE + CHECK + 5, interval=0.2,
                     what=f"the last instance removed ({log.read_text(errors='replace')[-400:]})")
            wait_for(lambda: completion(listen).status_code == 503, CHECK + 10, interval=0.2,
                     what=f"503 once the last instance left ({log.read_text(errors='replace')[-400:]})")
        if openresty:
            assert nginx.worker_pids() == workers, "the openresty flavor adds a member with no reload"
    finally:
        for p in reversed(procs):
            stop_process_group(p)
        nginx.stop()


def test_a_taken_registry_port_is_one_line_exit_1_and_leaves_no_inventory(tmp_path: Path) -> None:
    """`--registry-listen` on a port another process holds: one line naming the option, the address and why
    (not an AttributeError traceback from the half-made server), exit 1 (the machine's state: systemd tries
    again; 2 would stop the unit for good), and the empty inventory the registry creates is not made."""
    listen = free_ports(1)[0]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        run = fdngx("sidecar", "-i", str(tmp_path / "reg.json"), "--out", str(tmp_path / "nginx.conf"),
                    "--mode", "standalone", "--listen", f"127.0.0.1:{listen}", "--no-reload",
                    "--registry-listen", f"127.0.0.1:{port}", "--metrics-listen", "off", timeout=60)
    assert run.returncode == 1, run.stderr
    assert run.stderr == (f"fdngx: error: --registry-listen 127.0.0.1:{port}: cannot listen: Address already in use; "
                          "another process listens there (ss -ltnp)\n"), run.stderr
    assert not (tmp_path / "reg.json").exists()
    assert not (tmp_path / "nginx.conf").exists()


def test_a_registry_server_that_cannot_bind_closes_cleanly() -> None:
    """The server is made unbound, then bound: a failed bind closes what was made, and close() after it (or a
    second close) is no error."""
    with socket.create_server(("127.0.0.1", 0)) as taken, pytest.raises(ListenError, match="cannot listen: Address"):
        RegistryServer(f"127.0.0.1:{taken.getsockname()[1]}")
    server = RegistryServer("127.0.0.1:0")  # never started: stop() neither waits for nor needs a registry
    server.stop()
    server.stop()


# -- the HTTP server's connection budgets (in-process, 127.0.0.1 only, no nginx) ----------------------------

PARTIAL = b"POST /register HTTP/1.1\r\nHost: r\r\nContent-Length: 100\r\n\r\n{"  # then nothing: held


@contextlib.contextmanager
def registry_server(tmp: Path, **kw: Any) -> Iterator[RegistryServer]:
    reg = Registry(tmp / "fdngx.json", settings=RegistrySettings.from_options(30), probe=HealthyProbe(),
                   names=NameCache(lambda name: []))
    server = RegistryServer("127.0.0.1:0", reg, **kw).start()
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def holding(port: int, n: int, source: str = "127.0.0.1") -> Iterator[list[socket.socket]]:
    """`n` connections from `source` to the registry, each sending part of a request and holding; all closed
    on leaving."""
    held: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=5, source_address=(source, 0))
            held.append(s)
            with contextlib.suppress(OSError):  # one the server closed at once may refuse the bytes
                s.sendall(PARTIAL)
        yield held
    finally:
        for s in held:
            s.close()


def ask(port: int, source: str = "127.0.0.1", timeout: float = 3.0) -> bytes:
    """GET /registered_number from `source`: the raw answer; b"" when the server closed the connection
    without one. A server that neither answers nor closes within `timeout` fails the test (socket.timeout)."""
    chunks: list[bytes] = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout, source_address=(source, 0)) as s:
        try:
            s.sendall(b"GET /registered_number HTTP/1.1\r\nHost: r\r\n\r\n")
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed at once: the request met a closed socket
    return b"".join(chunks)


def can_use_127_0_0_2() -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.2", 0))
        except OSError:
            return False
    return True


def test_one_address_holds_at_most_per_source_connections(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Outside review: every accepted connection took one of the 40 places before the source was judged, so one
    host sending slowly held them all and real heartbeats were closed at once. Now an address holds at most
    PER_SOURCE at once; its next ones are closed unanswered (said once a minute), and every count is released
    when its connections end (was: the 9th held connection was kept, and answered once a worker was free)."""
    assert PER_SOURCE < WORKERS + QUEUE
    with registry_server(tmp_path) as server:
        with caplog.at_level(logging.WARNING, logger="fdngx.registry"), holding(server.port, PER_SOURCE):
            # Accepted in the order they connect: the held ones are counted before these are judged.
            assert ask(server.port) == b"" and ask(server.port) == b""
            assert server.httpd.connections() == {"127.0.0.1": PER_SOURCE}
        said = [r.getMessage() for r in caplog.records if "the most one address may" in r.getMessage()]
        assert len(said) == 1 and "127.0.0.1" in said[0], caplog.text
        wait_for(lambda: server.httpd.connections() == {}, 5, what="every count released")
        assert ask(server.port).startswith(b"HTTP/1.1 200 ")


def test_sources_outside_the_allow_list_share_a_small_budget_and_still_get_their_403(tmp_path: Path) -> None:
    """Outside the allow-list (here everything local: only 10.0.0.0/8 may call, a source filter that contacts
    nothing), at most OUTSIDE connections at once, all such sources together; beyond them a connection is
    closed unanswered (was: it took a place of the pool and was answered). Within the budget: the one-line
    JSON 403."""
    with registry_server(tmp_path, allow="10.0.0.0/8") as server:
        with holding(server.port, OUTSIDE):
            assert ask(server.port) == b""
            assert server.httpd.connections() == {"outside": OUTSIDE}
        wait_for(lambda: server.httpd.connections() == {}, 5, what="every count released")
        resp = ask(server.port)
        assert resp.startswith(b"HTTP/1.1 403 "), resp[:200]
        body = resp.partition(b"\r\n\r\n")[2]
        assert b"\n" not in body and "--registry-allow 10.0.0.0/8" in json.loads(body)["msg"]


@pytest.mark.skipif(not can_use_127_0_0_2(), reason="needs 127.0.0.2 as a second local source address")
def test_callers_outside_the_allow_list_cannot_starve_an_allowed_one(tmp_path: Path) -> None:
    """The outside review's case: a source outside --registry-allow (127.0.0.2 here; only 127.0.0.1 is allowed)
    opens every place the pool has and sends slowly. Was: all 40 taken, the allowed caller closed at once. Now
    the outside ones hold OUTSIDE places of their own, on their own threads, and the allowed caller is
    answered at once."""
    with registry_server(tmp_path, allow="127.0.0.1/32") as server:
        with holding(server.port, WORKERS + QUEUE, source="127.0.0.2"):
            resp = ask(server.port, source="127.0.0.1")
            assert resp.startswith(b"HTTP/1.1 200 "), resp[:200]
            assert server.httpd.connections().get("outside", 0) <= OUTSIDE
        wait_for(lambda: server.httpd.connections() == {}, 5, what="every count released")


def test_a_connection_accepted_while_shutting_down_is_closed_and_released(tmp_path: Path) -> None:
    with registry_server(tmp_path) as server:
        server.httpd.pool.shutdown(wait=True)  # what stop() does first: a new connection finds no worker
        assert ask(server.port) == b""
        wait_for(lambda: server.httpd.connections() == {}, 5, what="the count released")


def test_connections_still_queued_for_a_worker_at_shutdown_are_closed_and_released(tmp_path: Path) -> None:
    """One worker, held by a slow caller; the next connection waits in the queue. Stopping the server cancels
    the queued one: it is closed at once and its count released (was: dropped unclosed, its count and its
    place in the pool held for good)."""
    server = RegistryServer("127.0.0.1:0", Registry(tmp_path / "fdngx.json", settings=RegistrySettings.from_options(30),
                                                     probe=HealthyProbe(), names=NameCache(lambda name: [])),
                            workers=1, read_deadline=60).start()
    try:
        with holding(server.port, 2) as held:
            wait_for(lambda: server.httpd.connections() == {"127.0.0.1": 2}, 5, what="one served, one queued")
            server.stop()
            readable, _, _ = select.select(held, [], [], 5)
            assert len(readable) == 1, "the queued connection is closed at once; the served one still reads"
            with contextlib.suppress(ConnectionResetError):  # closed with the unread PARTIAL: may be a reset
                assert readable[0].recv(1) == b""
            wait_for(lambda: server.httpd.connections() == {"127.0.0.1": 1}, 5, what="the queued count released")
        wait_for(lambda: server.httpd.connections() == {}, 5, what="every count released")
        slots = server.httpd.slots
        assert all(slots.acquire(blocking=False) for _ in range(server.httpd.capacity))
    finally:
        server.stop()


class HealthServers:
    """`n` servers on 127.0.0.1 answering GET /health on keep-alive connections (200; 503 for the ports in
    `failing`), each counting the connections it has open."""

    def __init__(self, n: int) -> None:
        self.lock = threading.Lock()
        self.open: collections.Counter[int] = collections.Counter()
        self.failing: set[int] = set()
        self.servers = [RawServer(self._serve) for _ in range(n)]
        self.ports = [s.port for s in self.servers]

    def _serve(self, conn: socket.socket) -> None:
        port = conn.getsockname()[1]
        with self.lock:
            self.open[port] += 1
        try:
            while read_request(conn):  # b"": the client closed it
                status = b"503 Service Unavailable" if port in self.failing else b"200 OK"
                conn.sendall(b"HTTP/1.1 " + status + b"\r\nContent-Length: 2\r\n\r\nok")
        finally:
            with self.lock:
                self.open[port] -= 1

    def opened(self) -> dict[int, int]:
        with self.lock:
            return {p: self.open[p] for p in self.ports}

    def close(self) -> None:
        for server in self.servers:
            server.close()


def test_the_health_probe_closes_its_idle_connections_to_instances_that_left(tmp_path: Path) -> None:
    """The registry's /health probe (its real client) kept its idle keep-alive connections to instances that had
    left, for as long as it ran: with rollouts on new ports, sockets piled up. Each periodic check now closes
    those to instances no longer in the file: deleted by hand, or removed by that very check."""
    body = json.loads((FIXTURE.parent / "upstream" / "fastdeploy-register-body.json").read_text())
    srv = HealthServers(4)
    kept, hand_a, hand_b, failing = srv.ports
    path, now = tmp_path / "fdngx.json", [1000.0]
    reg = Registry(path, settings=RegistrySettings.from_options(30), names=NameCache(lambda name: []),
                   clock=lambda: now[0])
    try:
        for port in srv.ports:
            got = reg.register({**body, "host_ip": "127.0.0.1", "port": port, "metrics_port": port}, "127.0.0.1")
            assert got == (200, {"code": 200, "msg": "Register success"})
        assert reg.check() == []
        wait_for(lambda: srv.opened() == dict.fromkeys(srv.ports, 1), 5, what="one kept-alive connection each")
        srv.failing.add(failing)
        data = json.loads(path.read_text())
        data["instances"] = [i for i in data["instances"] if i["port"] not in (hand_a, hand_b)]
        path.write_text(json.dumps(data))  # by hand
        assert reg.check() == []
        left = {kept: 1, hand_a: 0, hand_b: 0, failing: 1}
        wait_for(lambda: srv.opened() == left, 2, what=f"the deleted ones' closed ({srv.opened()} != {left})")
        now[0] += 31  # /health failing for more than --registry-grace: this check removes it
        assert reg.check() == [instance_name("127.0.0.1", failing)]
        left[failing] = 0
        wait_for(lambda: srv.opened() == left, 2, what=f"the removed one's closed ({srv.opened()} != {left})")
        idle = reg.probe.client._idle  # type: ignore[attr-defined]
        assert {k for k, conns in idle.items() if conns} == {("127.0.0.1", kept)}
    finally:
        reg.close()
        srv.close()


def test_a_health_probe_without_an_answer_in_time_says_so_in_its_503(tmp_path: Path) -> None:
    """The registry's /health probe of an instance that accepts and does not answer in time: a 503 that said
    "scrape deadline exceeded" (the shared HTTP client's words; seen once in a 600-instance run, unexplained).
    It says how long the probe waited."""
    release = threading.Event()

    def silent(conn: socket.socket) -> None:
        read_request(conn)
        release.wait(10)  # answers nothing; bounded

    path = tmp_path / "fdngx.json"
    reg = Registry(path, settings=RegistrySettings.from_options(30), names=NameCache(lambda name: []),
                   probe=HttpProbe(health_timeout=0.5))
    try:
        with RawServer(silent) as srv:
            status, doc = reg.register({"role": "mixed", "host_ip": "127.0.0.1", "port": srv.port}, "127.0.0.1")
            release.set()
        assert status == 503, doc
        assert doc["msg"] == f"service is not healthy: GET 127.0.0.1:{srv.port}/health: no answer within 0.5 s"
        assert json.loads(path.read_text())["instances"] == []
    finally:
        release.set()
        reg.close()

def test_own_python_servers_on_the_ipv6_wildcard_count_for_ipv4_too() -> None:
    """fdngx's registry and metrics servers on [::] answer on 127.0.0.1 too (no IPV6_V6ONLY): an IPv4
    registration at their port was taken (a review of the refusal)."""
    from fdngx.commands.sidecar import own_listeners
    from fdngx.domain import Listen
    from fdngx.nginx.render import RenderOptions

    own = own_listeners(RenderOptions(), None, None, Listen("::", 18400))
    settings = RegistrySettings(own=own)
    assert settings.own_listener("127.0.0.1", 18400) is not None
    assert settings.own_listener("::1", 18400) is not None


def test_an_unreadable_registry_file_is_a_500_not_an_empty_fleet(tmp_path: Path) -> None:
    """GET /registered answered 200 {"mixed": []} of a corrupted file (an outside review): a caller read
    "nothing registered". Now 500, like a registration, naming no server path."""
    with registry_server(tmp_path) as server:
        (tmp_path / "fdngx.json").write_text("{ broken")
        for route in ("/registered", "/registered_number"):
            r = requests.get(f"http://127.0.0.1:{server.port}{route}", timeout=5)
            assert r.status_code == 500 and "could not read" in r.json()["msg"], (route, r.text)
            assert str(tmp_path) not in r.text
        (tmp_path / "fdngx.json").write_text('{"instances": []}')
        assert requests.get(f"http://127.0.0.1:{server.port}/registered_number", timeout=5).json()["mixed"] == 0
