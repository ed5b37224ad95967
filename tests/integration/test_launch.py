"""`fdngx launch` / `fdngx stop` end to end over real `fdngx sim` processes.

Every test records each PID fdngx reports (inventory, pidfile) and kills what is left by PID at teardown,
even when the test fails. Waits poll with generous bounds: CI has two noisy cores.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from fdngx.system import procs
from tests.support import free_ports, http_ok, wait_for

pytestmark = pytest.mark.skipif(
    not (Path(__file__).resolve().parents[2] / "fdngx" / "commands" / "sim.py").exists(),
    reason="fdngx sim is not there yet",
)

STARTUP = 90.0  # seconds: a sim starts in ~1 s, but CI is slow and shared


class Launcher:
    """Runs `fdngx launch` in a temp dir, remembers every PID it learns of, and cleans up by PID."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.inv = tmp / "fdngx.json"
        self.pidfile = tmp / "fdngx.json.pid"
        self.procs: list[subprocess.Popen[str]] = []
        self.pids: dict[int, int | None] = {}

    def cmd(self, *args: str) -> list[str]:
        return [sys.executable, "-m", "fdngx.cli", *args]

    def start(self, *args: str) -> subprocess.Popen[str]:
        """A foreground launch, in its own session like a shell job (we signal it as Ctrl-C would)."""
        p = subprocess.Popen(
            self.cmd("launch", "--inventory", str(self.inv), *args),
            cwd=self.tmp,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        self.procs.append(p)
        self.pids[p.pid] = procs.starttime(p.pid)
        return p

    def run(self, *args: str, timeout: float = STARTUP + 30) -> subprocess.CompletedProcess[str]:
        r = subprocess.run(self.cmd(*args), cwd=self.tmp, capture_output=True, text=True, timeout=timeout)
        self.remember()
        return r

    def inventory(self) -> dict[str, Any]:
        doc = json.loads(self.inv.read_text())
        self.remember(doc)
        return doc

    def remember(self, doc: dict[str, Any] | None = None) -> None:
        with contextlib.suppress(OSError, ValueError):
            doc = doc or json.loads(self.inv.read_text())
        for inst in (doc or {}).get("instances", []):
            if inst.get("pid"):
                self.pids.setdefault(inst["pid"], procs.starttime(inst["pid"]))
        with contextlib.suppress(OSError, ValueError):
            pf = json.loads(self.pidfile.read_text())
            self.pids.setdefault(pf["supervisor"]["pid"], pf["supervisor"]["start"])
            for c in pf["children"]:
                if c.get("pid"):
                    self.pids.setdefault(c["pid"], c["start"])

    def wait_ready(self, p: subprocess.Popen[str] | None = None, n: int | None = None) -> dict[str, Any]:
        def ready() -> dict[str, Any] | None:
            if p is not None and p.poll() is not None:
                raise AssertionError(f"launch exited {p.returncode}: {p.stderr.read() if p.stderr else ''}")
            if not self.inv.exists():
                return None
            doc = self.inventory()
            ok = all(i.get("status") == "running" for i in doc["instances"])
            return doc if ok and (n is None or len(doc["instances"]) == n) else None

        return wait_for(ready, timeout=STARTUP, interval=0.2, what="inventory with every instance running")

    def alive(self) -> list[int]:
        return [pid for pid, start in self.pids.items() if procs.same_process(pid, start)]

    def assert_all_gone(self) -> None:
        wait_for(lambda: not self.alive(), timeout=30, interval=0.1, what="every recorded PID to exit")

    def cleanup(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(10)
        self.remember()
        for pid in self.alive():
            # Children run in their own sessions: pgid == pid. Only processes we recorded are signalled.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL) if os.getpgid(pid) == pid else os.kill(pid, signal.SIGKILL)


@pytest.fixture
def launcher(tmp_path: Path) -> Iterator[Launcher]:
    lx = Launcher(tmp_path)
    try:
        yield lx
    finally:
        lx.cleanup()


def sim_ports(n: int) -> list[str]:
    ports = free_ports(2 * n)
    return ["--ports", ",".join(map(str, ports[:n])), "--metrics-ports", ",".join(map(str, ports[n:]))]


def health(inst: dict[str, Any]) -> bool:
    return http_ok(f"http://{inst['host']}:{inst['port']}/health")


def ports_free(doc_or_ports: list[int]) -> bool:
    for port in doc_or_ports:
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                return False
    return True


def test_port_conflict_is_one_line_naming_the_port_and_writes_nothing(launcher: Launcher) -> None:
    ports = free_ports(4)
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", ports[1]))
        busy.listen()
        r = launcher.run("launch", "--engine", "sim", "-n", "2", "--inventory", str(launcher.inv),
                         "--ports", f"{ports[0]},{ports[1]}", "--metrics-ports", f"{ports[2]},{ports[3]}")  # fmt: skip
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if "error" in line]
    assert len(errors) == 1, r.stderr
    assert f"port {ports[1]} is in use by pid {os.getpid()}" in errors[0]
    assert not launcher.inv.exists() and not launcher.pidfile.exists()
    assert not (launcher.tmp / "fdngx-logs").exists()


def test_sim_launch_end_to_end_then_sigterm_leaves_no_process(launcher: Launcher) -> None:
    p = launcher.start("--engine", "sim", "-n", "3", *sim_ports(3), "--", "--max-num-seqs", "16")
    doc = launcher.wait_ready(p, 3)
    assert [i["name"] for i in doc["instances"]] == ["dp0", "dp1", "dp2"]
    assert all(i["max_num_seqs"] == 16 and i["engine"] == "sim" for i in doc["instances"])
    assert len({i["pid"] for i in doc["instances"]}) == 1  # one sim process hosts all (like multi_api_server)
    assert all(health(i) for i in doc["instances"])
    metrics = requests.get(f"http://127.0.0.1:{doc['instances'][2]['metrics_port']}/metrics", timeout=5).text
    assert "fastdeploy:num_requests_running" in metrics
    assert Path(doc["instances"][0]["log"]).exists()
    assert json.loads(launcher.pidfile.read_text())["state"] == "ready"

    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    launcher.assert_all_gone()
    assert all(i["status"] == "stopped" for i in launcher.inventory()["instances"])
    assert not launcher.pidfile.exists()
    assert "stopped every replica" in (p.stderr.read() if p.stderr else "")


def test_ctrl_c_on_per_instance_launch_leaves_no_process(launcher: Launcher) -> None:
    p = launcher.start("--engine", "sim", "-n", "2", "--per-instance", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    pids = [i["pid"] for i in doc["instances"]]
    assert len(set(pids)) == 2
    os.kill(p.pid, signal.SIGINT)
    assert p.wait(60) == 130
    launcher.assert_all_gone()
    assert ports_free([i["port"] for i in doc["instances"]])


def test_child_crash_is_reported_and_marked_in_the_inventory(launcher: Launcher) -> None:
    p = launcher.start("--engine", "sim", "-n", "2", "--per-instance", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    victim = doc["instances"][1]
    os.kill(victim["pid"], signal.SIGKILL)

    def marked() -> dict[str, Any] | None:
        inst = launcher.inventory()["instances"][1]
        return inst if inst["status"] == "exited" else None

    inst = wait_for(marked, timeout=30, interval=0.2, what="dp1 marked exited")
    assert inst["exit_code"] == -9
    assert launcher.inventory()["instances"][0]["status"] == "running"
    assert health(doc["instances"][0])
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    err = p.stderr.read() if p.stderr else ""
    assert f"dp1 (pid {victim['pid']}, serving dp1) was killed by SIGKILL" in err
    launcher.assert_all_gone()


def test_sim_crash_fault_marks_the_rank_down(launcher: Launcher) -> None:
    p = launcher.start("--engine", "sim", "-n", "2", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    crashed = doc["instances"][0]
    r = requests.post(f"http://127.0.0.1:{crashed['metrics_port']}/sim/fault", json={"crash": True}, timeout=5)
    assert r.status_code == 200

    def down() -> bool:
        return launcher.inventory()["instances"][0]["status"] == "down"

    wait_for(down, timeout=30, interval=0.2, what="dp0 marked down")
    assert launcher.inventory()["instances"][1]["status"] == "running"
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    assert "dp0 of sim" in (p.stderr.read() if p.stderr else "")
    launcher.assert_all_gone()


def test_restart_on_failure_brings_the_replica_back(launcher: Launcher) -> None:
    p = launcher.start("--engine", "sim", "-n", "2", "--per-instance", "--restart", "on-failure", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    old = doc["instances"][0]["pid"]
    os.kill(old, signal.SIGKILL)

    def back() -> dict[str, Any] | None:
        inst = launcher.inventory()["instances"][0]
        return inst if inst["pid"] != old and inst["status"] == "running" else None

    inst = wait_for(back, timeout=STARTUP, interval=0.2, what="dp0 restarted and healthy")
    assert health(inst)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    launcher.assert_all_gone()


def test_detach_then_stop(launcher: Launcher) -> None:
    r = launcher.run("launch", "--engine", "sim", "-n", "2", "--detach", "--inventory", str(launcher.inv),
                     *sim_ports(2))  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "healthy" in r.stderr and "fdngx stop" in r.stderr
    doc = launcher.inventory()
    assert all(i["status"] == "running" and health(i) for i in doc["instances"])
    pf = json.loads(launcher.pidfile.read_text())
    sup = pf["supervisor"]
    assert procs.same_process(sup["pid"], sup["start"])
    # A second launch on the same inventory refuses while the first is supervised.
    again = launcher.run("launch", "--engine", "sim", "-n", "2", "--inventory", str(launcher.inv), *sim_ports(2))
    assert again.returncode == 1 and "fdngx stop" in again.stderr

    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    assert f"stopped supervisor pid {sup['pid']}" in s.stdout
    assert f"sim pid {doc['instances'][0]['pid']} serving dp0, dp1" in s.stdout
    launcher.assert_all_gone()
    assert not launcher.pidfile.exists()
    # Stopping twice is harmless.
    assert launcher.run("stop", "--inventory", str(launcher.inv)).returncode == 0


def test_early_exit_stops_everything_and_prints_the_log_tail(launcher: Launcher) -> None:
    ports = sim_ports(2)
    r = launcher.run("launch", "--engine", "sim", "-n", "2", "--inventory", str(launcher.inv), *ports,
                     "--", "--no-such-sim-flag")  # fmt: skip
    assert r.returncode == 1
    assert "exited with status 2 before /health was 200" in r.stderr
    assert "No such option" in r.stderr  # the child's own words, from its log tail
    assert not launcher.inv.exists() and not launcher.pidfile.exists()


def test_health_timeout_stops_everything(launcher: Launcher) -> None:
    ports = sim_ports(2)
    r = launcher.run("launch", "--engine", "sim", "-n", "2", "--per-instance", "--timeout", "5",
                     "--inventory", str(launcher.inv), *ports, "--", "--unhealthy")  # fmt: skip
    assert r.returncode == 1
    assert "timed out after 5s waiting for /health on dp0 (HTTP 404), dp1 (HTTP 404)" in r.stderr
    assert not launcher.inv.exists()
    wait_for(lambda: ports_free([int(x) for x in ports[1].split(",")]), timeout=30, what="ports released")


def test_detach_failure_reports_and_leaves_nothing(launcher: Launcher) -> None:
    r = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(launcher.inv),
                     *sim_ports(1), "--", "--no-such-sim-flag")  # fmt: skip
    assert r.returncode == 1
    assert "exited with status 2 before /health was 200" in r.stderr
    assert "No such option" in r.stderr
    assert not launcher.pidfile.exists() and not launcher.inv.exists()


@pytest.mark.nginx
def test_detach_render_standalone_nginx_serves_all_replicas_then_stop(launcher: Launcher, prefix: Path) -> None:
    """The issue's "done when": launch --detach, render --mode standalone, nginx spreads over all, stop."""
    from tests.support import Nginx

    n = 4
    r = launcher.run("launch", "--engine", "sim", "-n", str(n), "--detach", "--inventory", str(launcher.inv),
                     *sim_ports(n))  # fmt: skip
    assert r.returncode == 0, r.stderr
    listen = free_ports(1)[0]
    conf = prefix / "nginx.conf"
    rendered = launcher.run("render", "--inventory", str(launcher.inv), "--mode", "standalone", "--prefix",
                            str(prefix), "--listen", f"127.0.0.1:{listen}", "--out", str(conf))  # fmt: skip
    assert rendered.returncode == 0, rendered.stderr
    with Nginx(prefix).start(f"http://127.0.0.1:{listen}/health"):
        seen = set()
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        for _ in range(4 * n):
            resp = requests.post(f"http://127.0.0.1:{listen}/v1/chat/completions", json=body, timeout=30)
            assert resp.status_code == 200
            seen.add(resp.headers.get("X-Fdngx-Replica"))
        ports = {str(i["port"]) for i in launcher.inventory()["instances"]}
        assert seen == ports
    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    launcher.assert_all_gone()


# A stand-in for a FastDeploy api_server: it starts a "GPU worker" in a session of its own (as FastDeploy
# does with setsid), so stopping the server's process group alone would orphan the worker.
FAKE_ENGINE = """
import http.server, subprocess, sys
port, worker_file = int(sys.argv[1]), sys.argv[2]
w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(worker_file, "w").write(str(w.pid))
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def fake_plan(tmp: Path, restart: str = "no") -> tuple[Any, Path]:
    from fdngx.domain import Engine, Instance, Inventory, Restart
    from fdngx.engines.argv import ProcSpec
    from fdngx.launch.plan import Plan

    port, mport = free_ports(2)
    worker_file = tmp / "worker.pid"
    argv = [sys.executable, "-c", FAKE_ENGINE, str(port), str(worker_file)]
    spec = ProcSpec("fake", argv, {}, str(tmp / "logs" / "fake.log"), ["dp0"])
    inv = Inventory([Instance("dp0", "127.0.0.1", port, mport, Engine.SIM)])
    plan = Plan(Engine.SIM, [spec], inv, str(tmp / "fdngx.json"), str(tmp / "logs"), [port], 30.0, Restart(restart),
                5.0, False)
    return plan, worker_file


def test_stop_reaches_workers_that_left_the_process_group(launcher: Launcher) -> None:
    import io

    from fdngx.launch.run import launch, stop

    plan, worker_file = fake_plan(launcher.tmp)
    assert launch(plan, detach=True, out=io.StringIO()) == 0
    launcher.remember()
    worker = int(worker_file.read_text())
    launcher.pids[worker] = procs.starttime(worker)
    assert os.getpgid(worker) == worker  # really outside the server's group
    report = stop(launcher.inv, out=io.StringIO())
    assert any("stopped supervisor" in line for line in report)
    launcher.assert_all_gone()


def test_a_dead_leaders_orphaned_worker_is_stopped_too(launcher: Launcher) -> None:
    import io

    from fdngx.launch.run import launch, stop

    plan, worker_file = fake_plan(launcher.tmp)
    assert launch(plan, detach=True, out=io.StringIO()) == 0
    doc = launcher.inventory()
    worker = int(worker_file.read_text())
    wstart = procs.starttime(worker)
    launcher.pids[worker] = wstart
    os.kill(doc["instances"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: not procs.same_process(worker, wstart), timeout=30, what="the orphaned worker to be stopped")
    wait_for(lambda: launcher.inventory()["instances"][0]["status"] == "exited", timeout=30, what="dp0 marked exited")
    stop(launcher.inv, out=io.StringIO())
    launcher.assert_all_gone()


def test_a_lost_rank_restarts_its_whole_group(launcher: Launcher) -> None:
    """Like multi_api_server's ranks, the replicas of one sim process fail and restart together."""
    p = launcher.start("--engine", "sim", "-n", "2", "--restart", "on-failure", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    old = doc["instances"][0]["pid"]
    r = requests.post(f"http://127.0.0.1:{doc['instances'][1]['metrics_port']}/sim/fault", json={"crash": True},
                      timeout=5)  # fmt: skip
    assert r.status_code == 200

    def restarted() -> list[dict[str, Any]] | None:
        insts = launcher.inventory()["instances"]
        ok = all(i["pid"] != old and i["status"] == "running" for i in insts)
        return insts if ok else None

    insts = wait_for(restarted, timeout=STARTUP, interval=0.2, what="the sim group restarted")
    assert insts[0]["pid"] == insts[1]["pid"]
    assert all(health(i) for i in insts)
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    err = p.stderr.read() if p.stderr else ""
    assert "lost dp1" in err and "restarting sim (restart #1)" in err
    launcher.assert_all_gone()
