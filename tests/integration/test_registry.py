"""FastDeploy instances register themselves with `--router`: the sidecar's /register feeds nginx.

The replica is the simulator (`fdngx.sim`, a separate metrics port, as `multi_api_server --metrics-ports`
starts FastDeploy) and its registration is FastDeploy's own loop and body, reconstructed in
tests/fixtures/fastdeploy_register.py from `fastdeploy/engine/register_manager.py` and `fastdeploy/config.py`
(see that file for the commits). Only 127.0.0.1; every process is stopped by PID.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from fdngx.nginx.openresty import lua_modules
from fdngx.registry.core import instance_name
from fdngx.sim.process import start_sim
from tests.support import Backends, Nginx, fdngx, free_ports, stop_process_group, wait_for, write_inventory

pytestmark = pytest.mark.nginx

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


def test_fastdeploy_register_loop_end_to_end(tmp_path: Path) -> None:
    """Issue 11's Done-when: a replica started the way FastDeploy starts it (separate metrics port, the exact
    register loop and body of register_manager.py / config.py @ acfda944, no metrics_port) registers with
    fdngx, gets a load signal through --registry-metrics-port, takes traffic through nginx within one
    interval, and leaves within the grace after its heartbeats stop; the next heartbeat adds it back."""
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
                     "--registry-metrics-port", f"{met - api:+d}"],
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

            # Heartbeats stop: the instance leaves within the grace (+ one check period, + one apply).
            stop_process_group(procs.pop())
            stopped = time.monotonic()
            wait_for(lambda: f"127.0.0.1:{api}" not in conf.read_text(), GRACE + CHECK + 5, interval=0.1,
                     what="the silent replica leaving the config")
            gone = time.monotonic() - stopped
            assert GRACE - INTERVAL - 0.5 <= gone <= GRACE + CHECK + 3, gone
            assert requests.get(f"{url}/registered_number", timeout=5).json()["mixed"] == 1
            assert json.loads(own.read_text())["instances"] == []
            assert "no heartbeat" in log.read_text(errors="replace")

            # FastDeploy keeps posting while it lives: the next heartbeat adds it back.
            procs.append(start_register_loop(api, router))
            wait_for(lambda: served_by(listen, 8) >= {str(api)}, 10, interval=0.1, what="the replica back")
        finally:
            for p in reversed(procs):
                stop_process_group(p)
            if nginx is not None:
                nginx.stop()


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
            *flavor)
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
        with start_sim([api], [met], log_path=tmp_path / "sim.log"):
            wait_for(lambda: "no instance yet: nginx answers 503" in log.read_text(errors="replace"), 30,
                     what=f"the sidecar saying it waits for registrations ({log.read_text(errors='replace')[-300:]})")
            procs.append(start_register_loop(api, router))
            wait_for(lambda: served_by(listen, 4) == {str(api)}, 10, interval=0.1,
                     what=f"the registered replica serving ({log.read_text(errors='replace')[-400:]})")
            # Its heartbeats stop: the fleet is empty again (openresty: a snapshot that says `empty`), 503 again.
            stop_process_group(procs.pop())
            wait_for(lambda: completion(listen).status_code == 503, GRACE + CHECK + 5, interval=0.2,
                     what=f"503 once the last instance left ({log.read_text(errors='replace')[-400:]})")
        if openresty:
            assert nginx.worker_pids() == workers, "the openresty flavor adds a member with no reload"
    finally:
        for p in reversed(procs):
            stop_process_group(p)
        nginx.stop()
