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
import time
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

    def start(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
        """A foreground launch, in its own session like a shell job (we signal it as Ctrl-C would)."""
        p = subprocess.Popen(
            self.cmd("launch", "--inventory", str(self.inv), *args),
            cwd=self.tmp,
            env=env,
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

    def wait_child_started(self) -> None:
        """Until the supervisor recorded its first child's pid in the pidfile (remembered, to be stopped)."""
        def started() -> bool:
            with contextlib.suppress(OSError, ValueError, KeyError, IndexError):
                self.remember()
                return bool(json.loads(self.pidfile.read_text())["children"][0]["pid"])
            return False

        wait_for(started, timeout=STARTUP, interval=0.1, what="the replica started (its pid in the pidfile)")

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


def test_a_users_prometheus_multiproc_dir_is_not_shared_by_the_ranks(launcher: Launcher) -> None:
    # Shared, prometheus_client would sum every rank's counters into each rank's page.
    shared = launcher.tmp / "prom"
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(shared), "FDNGX_TEST_MARK": "kept"}
    p = launcher.start("--engine", "sim", "-n", "2", *sim_ports(2), "--per-instance", env=env)
    doc = launcher.wait_ready(p, 2)
    for pid in {i["pid"] for i in doc["instances"]}:
        environ = dict(v.split("=", 1) for v in Path(f"/proc/{pid}/environ").read_text().split("\0") if "=" in v)
        assert "PROMETHEUS_MULTIPROC_DIR" not in environ and environ["FDNGX_TEST_MARK"] == "kept"
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    out = (p.stdout.read() if p.stdout else "") + (p.stderr.read() if p.stderr else "")
    assert f"PROMETHEUS_MULTIPROC_DIR={shared} is not passed to the replicas" in out
    launcher.assert_all_gone()


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


# -- issue 10 item 6: stop signals only what it recorded; a signal during the health wait ----------------


def standin(tmp: Path, launcher: Launcher, *, leave_member: bool = False) -> tuple[int, int | None]:
    """A process in a session of its own, standing in for a process that got a pid fdngx once recorded.

    leave_member: its leader exits at once and leaves a member alive in its group (a group whose id a stale
    pidfile might name after the kernel reused it). Returns (pid or group id, the member's pid)."""
    member_file = tmp / f"member-{len(launcher.pids)}"
    code = (
        "import os, subprocess, sys, time\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(member_file)!r}, 'w').write(str(p.pid))\n"
        + ("os._exit(0)\n" if leave_member else "time.sleep(600)\n")
    )
    proc = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    launcher.procs.append(proc)  # type: ignore[arg-type]
    member = int(wait_for(lambda: member_file.exists() and member_file.read_text(), timeout=30, what="member"))
    launcher.pids[proc.pid] = procs.starttime(proc.pid)
    launcher.pids[member] = procs.starttime(member)
    if leave_member:
        proc.wait(30)
        assert os.getpgid(member) == proc.pid  # the group lives on without its leader
    return proc.pid, member


def write_stale_pidfile(launcher: Launcher, children: list[dict[str, Any]], sup: tuple[int, int | None]) -> None:
    launcher.inv.write_text(json.dumps({"version": 1, "upstream": "fastdeploy", "instances": []}))
    launcher.pidfile.write_text(json.dumps({
        "supervisor": {"pid": sup[0], "start": sup[1]}, "state": "ready", "detached": True, "engine": "sim",
        "inventory": str(launcher.inv), "grace": 2, "children": children, "instances": {},
    }))  # fmt: skip


def test_stop_never_signals_a_process_whose_start_time_differs(launcher: Launcher) -> None:
    leader, member = standin(launcher.tmp, launcher)
    start = procs.starttime(leader)
    assert start is not None
    # A stale record: same pids, other start times (what a reused pid looks like).
    child = {"name": "sim", "pid": leader, "start": start + 1, "stop_signal": "SIGTERM", "instances": ["dp0"],
             "state": "running", "members": [[member, (procs.starttime(member) or 0) + 1]]}  # fmt: skip
    write_stale_pidfile(launcher, [child], (leader, start + 7))
    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    assert f"supervisor pid {leader} was not running (stale pidfile)" in s.stdout
    assert f"already gone: sim pid {leader}" in s.stdout
    time.sleep(0.5)
    assert procs.same_process(leader, start) and procs.alive(member)  # nobody signalled
    assert not launcher.pidfile.exists()


def test_stop_with_the_leader_gone_signals_only_recorded_members(launcher: Launcher) -> None:
    group, member = standin(launcher.tmp, launcher, leave_member=True)
    mstart = procs.starttime(member)
    assert mstart is not None
    # The group id's leader is gone: killpg would reach whoever is in that group now. Not recorded: untouched.
    child = {"name": "sim", "pid": group, "start": 12345, "stop_signal": "SIGTERM", "instances": ["dp0"],
             "state": "running", "members": []}  # fmt: skip
    write_stale_pidfile(launcher, [child], (group, 1))
    assert launcher.run("stop", "--inventory", str(launcher.inv)).returncode == 0
    time.sleep(0.5)
    assert procs.same_process(member, mstart)
    # Recorded with another start time: still untouched.
    write_stale_pidfile(launcher, [{**child, "members": [[member, mstart + 1]]}], (group, 1))
    assert launcher.run("stop", "--inventory", str(launcher.inv)).returncode == 0
    time.sleep(0.5)
    assert procs.same_process(member, mstart)
    # Recorded as that very process: stopped, by its own pid.
    write_stale_pidfile(launcher, [{**child, "members": [[member, mstart]]}], (group, 1))
    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    assert "stopped 1 recorded member process(es)" in s.stdout
    wait_for(lambda: not procs.same_process(member, mstart), timeout=30, what="the recorded member to stop")


def test_group_is_ours_needs_the_recorded_leader() -> None:
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    try:
        start = procs.starttime(p.pid)
        assert start is not None
        assert procs.group_is_ours(p.pid, start)
        assert not procs.group_is_ours(p.pid, start + 1)
        assert not procs.group_is_ours(p.pid, None)
    finally:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait(10)
    assert not procs.group_is_ours(p.pid, start)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_during_the_health_wait_exits_128_plus_the_signal(launcher: Launcher, sig: int) -> None:
    p = launcher.start("--engine", "sim", "-n", "2", "--per-instance", "--timeout", "120", *sim_ports(2),
                       "--", "--unhealthy")  # fmt: skip

    def children() -> list[int] | None:
        with contextlib.suppress(OSError, ValueError, KeyError):
            pf = json.loads(launcher.pidfile.read_text())
            pids = [c["pid"] for c in pf["children"] if c["pid"]]
            return pids if len(pids) == 2 and pf["instances"].get("dp1") == "HTTP 404" else None
        return None

    pids = wait_for(children, timeout=STARTUP, interval=0.2, what="both replicas answering 404")
    launcher.remember()
    os.kill(p.pid, sig)
    assert p.wait(60) == 128 + sig
    err = p.stderr.read() if p.stderr else ""
    assert "before every replica was healthy" in err and "no inventory written" in err
    assert not launcher.inv.exists() and not launcher.pidfile.exists()
    for pid in pids:
        wait_for(lambda pid=pid: not procs.alive(pid), timeout=30, what=f"pid {pid} to exit")
    launcher.assert_all_gone()


def test_sigterm_to_a_detaching_launch_before_ready_exits_143(launcher: Launcher) -> None:
    p = subprocess.Popen(
        launcher.cmd("launch", "--detach", "--inventory", str(launcher.inv), "--engine", "sim", "-n", "1",
                     "--timeout", "120", *sim_ports(1), "--", "--unhealthy"),
        cwd=launcher.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    launcher.procs.append(p)
    launcher.pids[p.pid] = procs.starttime(p.pid)

    def starting() -> bool:
        with contextlib.suppress(OSError, ValueError, KeyError):
            pf = json.loads(launcher.pidfile.read_text())
            return pf["instances"].get("dp0") == "HTTP 404"
        return False

    wait_for(starting, timeout=STARTUP, interval=0.2, what="the replica answering 404")
    launcher.remember()
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(90) == 128 + signal.SIGTERM
    assert "SIGTERM: stopped the supervisor and every replica" in (p.stderr.read() if p.stderr else "")
    launcher.assert_all_gone()
    assert not launcher.inv.exists()


# -- issue 11: SIGINT as multi_api_server's parent-death signal ---------------------------------------------

# Like multi_api_server: stops its ranks only from `except KeyboardInterrupt` (SIGINT's default action).
KEYBOARD_ONLY = """
import sys, time
try:
    while True:
        time.sleep(0.1)
except KeyboardInterrupt:
    open(sys.argv[1], "w").write("KeyboardInterrupt")
"""

# A supervisor stand-in that starts it through procs.start and is then SIGKILLed. It ignores SIGINT first,
# as a shell does for `cmd &`: an ignored signal survives exec, and must not survive into the engine.
PARENT = """
import signal, sys
from pathlib import Path
from fdngx.system import procs
signal.signal(signal.SIGINT, signal.SIG_IGN)
child = procs.start([sys.executable, "-c", sys.argv[1], sys.argv[2]], {}, Path(sys.argv[3]), "test",
                    death_signal=getattr(signal, sys.argv[4]))
print(child.pid, flush=True)
signal.pause()
"""


@pytest.mark.parametrize(("death", "handled"), [("SIGINT", True), ("SIGTERM", False)])
def test_parent_death_signal_reaches_the_engine(launcher: Launcher, death: str, handled: bool) -> None:
    marker = launcher.tmp / "marker"
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, KEYBOARD_ONLY, str(marker), str(launcher.tmp / "child.log"), death],
        stdout=subprocess.PIPE, text=True, start_new_session=True, cwd=Path(__file__).resolve().parents[2],
    )  # fmt: skip
    launcher.procs.append(parent)  # type: ignore[arg-type]
    assert parent.stdout is not None
    child = int(parent.stdout.readline())
    launcher.pids[child] = procs.starttime(child)
    time.sleep(0.5)  # let the child reach its try block
    os.kill(parent.pid, signal.SIGKILL)  # no chance to clean up: only the kernel's parent-death signal
    parent.wait(10)
    wait_for(lambda: not procs.alive(child), timeout=30, what="the orphaned child to stop")
    # SIGINT runs multi_api_server's KeyboardInterrupt path (it stops its ranks); SIGTERM kills it outright.
    assert (marker.exists() and marker.read_text() == "KeyboardInterrupt") is handled


# -- coupled ranks (vLLM's external load balancing): one dies, all restart ----------------------------------


def coupled_plan(tmp: Path, restart: str) -> Any:
    from dataclasses import replace

    from fdngx.engines.argv import LaunchRequest
    from fdngx.launch.plan import build_plan

    ports = [int(x) for x in free_ports(4)]
    req = LaunchRequest(engine="sim", num_servers=2, per_instance=True, inventory=tmp / "fdngx.json",
                        ports=ports[:2], metrics_ports=ports[2:], restart=restart, grace=5.0)  # fmt: skip
    return replace(build_plan(req), coupled=True)


def test_coupled_ranks_restart_together(launcher: Launcher) -> None:
    import io

    from fdngx.launch.run import launch, stop

    plan = coupled_plan(launcher.tmp, "on-failure")
    assert launch(plan, detach=True, out=io.StringIO()) == 0
    doc = launcher.inventory()
    old = [i["pid"] for i in doc["instances"]]
    os.kill(old[0], signal.SIGKILL)

    def both_new() -> list[dict[str, Any]] | None:
        insts = launcher.inventory()["instances"]
        ok = all(i["pid"] not in old and i["status"] == "running" for i in insts)
        return insts if ok else None

    insts = wait_for(both_new, timeout=STARTUP, interval=0.2, what="both ranks restarted")
    assert all(health(i) for i in insts)
    assert not procs.alive(old[1])  # the surviving rank was stopped, not left running alone
    log = (Path(plan.log_dir) / "supervisor.log").read_text()
    assert "stopping dp1: ranks of one data-parallel group cannot run without dp0" in log
    stop(launcher.inv, out=io.StringIO())
    launcher.assert_all_gone()


def test_coupled_ranks_exit_together_without_restart(launcher: Launcher) -> None:
    import io

    from fdngx.launch.run import launch, stop

    plan = coupled_plan(launcher.tmp, "no")
    assert launch(plan, detach=True, out=io.StringIO()) == 0
    doc = launcher.inventory()
    os.kill(doc["instances"][1]["pid"], signal.SIGKILL)

    def exited() -> bool:
        return all(i["status"] == "exited" for i in launcher.inventory()["instances"])

    wait_for(exited, timeout=30, interval=0.2, what="both ranks marked exited")
    wait_for(lambda: not procs.alive(doc["instances"][0]["pid"]), timeout=30, what="dp0 stopped with dp1")
    stop(launcher.inv, out=io.StringIO())
    launcher.assert_all_gone()


# -- typed health probe, absolute paths -----------------------------------------------------------------


def test_health_probe_states_against_real_sockets() -> None:
    import http.server
    import threading

    from fdngx.launch.probe import HealthState, health

    class NotHealthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(404)
            self.end_headers()

        def log_message(self, *a: Any) -> None:
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), NotHealthy)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen()  # accepts connections, never answers
    try:
        assert health("127.0.0.1", srv.server_address[1]).state is HealthState.HTTP_STATUS
        assert health("127.0.0.1", srv.server_address[1]).status == 404
        free = free_ports(1)[0]
        assert health("127.0.0.1", free).state is HealthState.NOT_LISTENING
        h = health("127.0.0.1", silent.getsockname()[1], timeout=0.5)
        assert h.state is HealthState.TIMEOUT and str(h) == "no answer in 0s"
    finally:
        srv.shutdown()
        srv.server_close()
        silent.close()


def test_stop_errors_name_absolute_paths(launcher: Launcher) -> None:
    r = launcher.run("stop", "--inventory", "nowhere.json")
    assert r.returncode == 1
    assert f"{launcher.tmp}/nowhere.json: no such inventory and no pidfile {launcher.tmp}/nowhere.json.pid" in r.stderr


def test_stop_popen_group_reaches_members_that_outlived_their_leader(tmp_path: Path) -> None:
    member_file = tmp_path / "member"
    code = (
        "import os, subprocess, sys\n"
        "p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(600)'])\n"
        f"open({str(member_file)!r}, 'w').write(str(p.pid))\n"
        "os._exit(0)\n"
    )
    leader = subprocess.Popen([sys.executable, "-c", code], start_new_session=True)
    member = int(wait_for(lambda: member_file.exists() and member_file.read_text(), timeout=30, what="member"))
    mstart = procs.starttime(member)
    try:
        wait_for(lambda: procs.starttime(leader.pid) is None, timeout=30, what="the leader to exit (a zombie)")
        procs.stop_popen_group(leader, grace=5)
        wait_for(lambda: not procs.same_process(member, mstart), timeout=30, what="the member to be stopped")
        assert leader.returncode == 0
        procs.stop_popen_group(leader, grace=5)  # idempotent, and signals nothing once reaped
    finally:
        if procs.same_process(member, mstart):
            os.kill(member, signal.SIGKILL)


def test_stop_does_not_claim_to_stop_a_replica_that_had_exited(launcher: Launcher) -> None:
    """dp1 exits on its own (a clean exit: not restarted); `fdngx stop` later said "stopped dp1 pid N" for it."""
    r = launcher.run("launch", "--engine", "sim", "-n", "2", "--per-instance", "--detach", "--inventory",
                     str(launcher.inv), *sim_ports(2))  # fmt: skip
    assert r.returncode == 0, r.stderr
    pids = {i["name"]: i["pid"] for i in launcher.inventory()["instances"]}
    os.kill(pids["dp1"], signal.SIGTERM)
    wait_for(lambda: {i["name"]: i["status"] for i in launcher.inventory()["instances"]}.get("dp1") == "exited", 30,
             what="the supervisor recording dp1's exit")
    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    assert f"already gone: dp1 pid {pids['dp1']} serving dp1" in s.stdout, s.stdout
    assert f"stopped dp0 pid {pids['dp0']} serving dp0" in s.stdout, s.stdout
    launcher.assert_all_gone()
