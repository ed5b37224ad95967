"""`fdngx launch` keeps its promises when the world around it misbehaves.

A terminal that hangs up, files it cannot write, processes it cannot start, restarts that leave workers
behind, two launches at once, somebody else's server on a replica's port, a stale pidfile: the replicas
are stopped when, and only when, they should be. Every PID a test learns of is killed by PID at teardown.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import pty
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import requests

from fdngx.domain import Engine, Instance, Inventory, Restart
from fdngx.engines.argv import ProcSpec
from fdngx.launch.pidfile import live_supervisor, read_pidfile
from fdngx.launch.plan import Plan
from fdngx.launch.run import launch, preflight, stop
from fdngx.system import procs
from tests.integration.test_launch import STARTUP, Launcher, health, sim_ports, standin, write_stale_pidfile
from tests.support import REPO, answering, free_ports, wait_for

# A stand-in for a FastDeploy api_server: its "GPU worker" runs in a session of its own, its pid appended to
# a file. GET /crash starts one more worker and dies at once, so that worker is reparented to the
# supervisor (the subreaper) before any look at the server's descendants can have seen it.
ENGINE = """
import http.server, os, subprocess, sys
port, worker_file = int(sys.argv[1]), sys.argv[2]
def worker():
    w = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
    with open(worker_file, "a") as f:
        f.write(f"{w.pid}\\n")
worker()
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/crash":
            worker()
            os._exit(1)
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""

# Never listens: whatever answers on its port is somebody else.
SILENT = "import sys, time; open(sys.argv[2], 'w').write('started'); time.sleep(600)"

# Its worker goes through a parent that exits at once (reparented to the supervisor) and ends after 2 s:
# a zombie of the supervisor unless the supervisor reaps it.
SHORT_WORKER = """
import http.server, subprocess, sys
port, worker_file = int(sys.argv[1]), sys.argv[2]
subprocess.run([sys.executable, "-c", "import subprocess, sys; w = subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(2)'], start_new_session=True); open(sys.argv[1], 'w').write(str(w.pid))",
                worker_file], check=True)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", port), H).serve_forever()
"""

# A foreground launch of a plan, in a process of its own (the supervisor is that process).
RUN_PLAN = (
    "import json, sys\n"
    "from fdngx.launch.plan import Plan\n"
    "from fdngx.launch.run import launch\n"
    "sys.exit(launch(Plan.from_dict(json.loads(sys.argv[1]))))\n"
)


def plan_of(tmp: Path, n: int = 1, restart: str = "no", engine: str = ENGINE, timeout: float = 30.0) -> Plan:
    """One process per replica dp<i>, each running `engine` with its port and the file it notes workers in."""
    ports = [int(p) for p in free_ports(2 * n)]
    specs = [ProcSpec(f"dp{i}", [sys.executable, "-c", engine, str(ports[i]), str(tmp / f"workers-dp{i}")], {},
                      str(tmp / "logs" / f"dp{i}.log"), [f"dp{i}"]) for i in range(n)]
    inv = Inventory([Instance(f"dp{i}", "127.0.0.1", ports[i], ports[n + i], Engine.SIM) for i in range(n)])
    return Plan(Engine.SIM, specs, inv, str(tmp / "fdngx.json"), str(tmp / "logs"), ports[:n], timeout,
                Restart(restart), 5.0, False)


def workers(launcher: Launcher, i: int) -> list[int]:
    """The workers dp<i>'s engine started so far, each remembered for the teardown."""
    path = launcher.tmp / f"workers-dp{i}"
    pids = [int(x) for x in path.read_text().split()] if path.exists() else []
    for pid in pids:
        launcher.pids.setdefault(pid, procs.starttime(pid))
    return pids


def foreground(launcher: Launcher, plan: Plan, stderr: Any) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", RUN_PLAN, json.dumps(plan.to_dict())], cwd=REPO,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr, text=True,
                         start_new_session=True)  # fmt: skip
    launcher.procs.append(p)
    launcher.pids[p.pid] = procs.starttime(p.pid)
    return p


def cli(launcher: Launcher, err: Path, *args: str) -> subprocess.Popen[str]:
    """A foreground `fdngx launch` whose stderr goes to a file the test reads as it goes."""
    with open(err, "w") as fh:
        p = subprocess.Popen(launcher.cmd("launch", "--inventory", str(launcher.inv), *args), cwd=launcher.tmp,
                             stdout=subprocess.DEVNULL, stderr=fh, text=True, start_new_session=True)  # fmt: skip
    launcher.procs.append(p)
    launcher.pids[p.pid] = procs.starttime(p.pid)
    return p


def gone(pid: int, start: int | None) -> bool:
    return not procs.same_process(pid, start)


# -- 1: stopping never depends on printing --------------------------------------------------------------


@pytest.mark.parametrize("stream", ["pipe", "pty"])
def test_a_hang_up_with_stderr_gone_still_stops_every_process(launcher: Launcher, stream: str) -> None:
    """SSH drops (a terminal that answers EIO) or `| head` exits (EPIPE): the stop must run all the same."""
    reader, writer = os.pipe() if stream == "pipe" else pty.openpty()
    plan = plan_of(launcher.tmp)
    p = foreground(launcher, plan, stderr=writer)
    os.close(writer)
    try:
        launcher.wait_ready(p, 1)
        worker = workers(launcher, 0)[0]
    finally:
        os.close(reader)  # nobody reads any more: the next write fails
    wstart = launcher.pids[worker]
    os.kill(p.pid, signal.SIGHUP)
    assert p.wait(60) == 0
    wait_for(lambda: gone(worker, wstart), timeout=30, what="the own-session worker to be stopped")
    launcher.assert_all_gone()
    assert not launcher.pidfile.exists()
    assert [i["status"] for i in launcher.inventory()["instances"]] == ["stopped"]


# -- 2: bookkeeping that fails is said once and retried; a restart that cannot start is a failed attempt --


def replace_with_dir(path: Path) -> None:
    def done() -> bool:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        with contextlib.suppress(FileExistsError):
            path.mkdir()
        return path.is_dir()

    wait_for(done, timeout=10, what=f"{path} replaced by a directory")


def test_files_it_cannot_write_are_said_once_and_retried_and_stop_nothing(launcher: Launcher) -> None:
    err = launcher.tmp / "stderr"
    p = cli(launcher, err, "--engine", "sim", "-n", "2", "--per-instance", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    # The inventory: a link into a directory that does not exist (ENOENT); the pidfile: a directory (refused).
    link = launcher.tmp / "link"
    link.symlink_to(launcher.tmp / "gone" / "fdngx.json")
    os.replace(link, launcher.inv)
    replace_with_dir(launcher.pidfile)
    os.kill(doc["instances"][0]["pid"], signal.SIGKILL)
    inv_warning = f"fdngx: warning: {launcher.inv}: not written (cannot write it in {launcher.tmp / 'gone'}: no such"
    pid_warning = f"fdngx: warning: {launcher.pidfile}: not written (not a regular file; refusing to replace it)"
    wait_for(lambda: inv_warning in err.read_text() and pid_warning in err.read_text(), timeout=30,
             what="a warning for each file")  # fmt: skip
    assert p.poll() is None and health(doc["instances"][1])
    launcher.pidfile.rmdir()

    def pidfile_again() -> bool:
        with contextlib.suppress(OSError, ValueError):
            pf = json.loads(launcher.pidfile.read_text())
            return pf["state"] == "ready" and pf["instances"]["dp0"] == "was killed by SIGKILL"
        return False

    wait_for(pidfile_again, timeout=30, what="the pidfile written again")
    launcher.inv.unlink()  # the link: the inventory was retried at every loop meanwhile, and can be written now
    wait_for(lambda: [i["status"] for i in launcher.inventory()["instances"]] == ["exited", "running"], timeout=30,
             what="the inventory written again")  # fmt: skip
    # the file is in place a moment before the launcher says so (books.py: written, then said)
    again = (f"fdngx: {launcher.inv}: written again", f"fdngx: {launcher.pidfile}: written again")
    wait_for(lambda: all(line in err.read_text() for line in again), timeout=10, what="'written again' said for both")
    text = err.read_text()
    assert text.count(f"warning: {launcher.inv}: not written") == 1, text
    assert text.count(f"warning: {launcher.pidfile}: not written") == 1, text
    assert f"fdngx: {launcher.inv}: written again" in text and f"fdngx: {launcher.pidfile}: written again" in text
    assert health(doc["instances"][1])
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    launcher.assert_all_gone()


def test_a_restart_that_cannot_start_is_a_failed_attempt_never_a_stop(launcher: Launcher) -> None:
    err = launcher.tmp / "stderr"
    p = cli(launcher, err, "--engine", "sim", "-n", "2", "--per-instance", "--restart", "on-failure", *sim_ports(2))
    doc = launcher.wait_ready(p, 2)
    old = doc["instances"][0]["pid"]
    log = Path(doc["instances"][0]["log"])
    replace_with_dir(log)  # its log cannot be opened: starting it fails (as EMFILE or EAGAIN would)
    os.kill(old, signal.SIGKILL)
    failed = f"fdngx: dp0: cannot start it ({log}: Is a directory); restart in "
    wait_for(lambda: err.read_text().count(failed) >= 2, timeout=60, what="two failed restarts")
    assert f"{failed}2s (--restart on-failure)" in err.read_text()  # the next attempt's longer backoff
    assert p.poll() is None and health(doc["instances"][1])
    log.rmdir()

    def back() -> dict[str, Any] | None:
        inst = launcher.inventory()["instances"][0]
        return inst if inst["pid"] != old and inst["status"] == "running" else None

    assert health(wait_for(back, timeout=STARTUP, interval=0.2, what="dp0 restarted"))
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    launcher.assert_all_gone()


# -- 3: a restart leaves nothing of the dead run behind, and touches nothing of the others ---------------


def test_a_restart_stops_the_dead_runs_workers_and_no_other_replicas(launcher: Launcher) -> None:
    plan = plan_of(launcher.tmp, n=2, restart="on-failure")
    assert launch(plan, detach=True, out=io.StringIO()) == 0
    doc = launcher.inventory()
    other = workers(launcher, 1)[0]
    with contextlib.suppress(requests.RequestException):
        requests.get(f"http://127.0.0.1:{doc['instances'][0]['port']}/crash", timeout=10)

    def back() -> bool:
        inst = launcher.inventory()["instances"][0]
        return inst["pid"] != doc["instances"][0]["pid"] and inst["status"] == "running"

    wait_for(back, timeout=STARTUP, interval=0.2, what="dp0 restarted")
    first, stray, new = workers(launcher, 0)
    # The stray was reparented to the supervisor the moment its server died; no look at any tree saw it.
    assert gone(first, launcher.pids[first]) and gone(stray, launcher.pids[stray])
    assert procs.same_process(new, launcher.pids[new])
    assert procs.same_process(other, launcher.pids[other]) and health(doc["instances"][1])
    stop(launcher.inv, out=io.StringIO())
    launcher.assert_all_gone()


# -- 4: one launch per inventory; /health from somebody else's server is not a healthy replica -----------


def test_a_launch_holding_the_lock_keeps_a_second_one_out(launcher: Launcher) -> None:
    lock = preflight(plan_of(launcher.tmp))  # the first launch, between its checks and its first pidfile write
    try:
        r = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(launcher.inv),
                         *sim_ports(1))  # fmt: skip
    finally:
        if lock is not None:
            lock.close()
    assert r.returncode == 1, r.stderr
    lock_file = launcher.tmp / ".fdngx.json.launch.lock"
    assert f"{lock_file}: another fdngx launch with this inventory holds the launch lock, held by pid {os.getpid()}" \
        in r.stderr
    assert not launcher.pidfile.exists()


def test_the_detached_supervisor_holds_the_lock_for_its_life_and_its_engines_do_not(launcher: Launcher) -> None:
    ports = sim_ports(1)
    r = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(launcher.inv), *ports)
    assert r.returncode == 0, r.stderr
    pf = json.loads(launcher.pidfile.read_text())
    sup, engine = pf["supervisor"]["pid"], pf["children"][0]["pid"]
    lock_file = str(launcher.tmp / ".fdngx.json.launch.lock")

    def holds(pid: int) -> bool:
        fds = Path(f"/proc/{pid}/fd")
        return any(os.readlink(fd) == lock_file for fd in fds.iterdir() if fd.is_symlink())

    assert holds(sup)
    assert not any(holds(pid) for pid in [engine, *procs.descendants(engine)])
    saved = launcher.pidfile.read_text()
    launcher.pidfile.unlink()  # a pidfile lost: the lock alone still keeps a second launch out
    again = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(launcher.inv), *ports)
    launcher.pidfile.write_text(saved)
    assert again.returncode == 1 and f"held by pid {sup}" in again.stderr, again.stderr
    assert launcher.run("stop", "--inventory", str(launcher.inv)).returncode == 0
    launcher.assert_all_gone()


def test_health_from_somebody_elses_server_on_the_port_fails_the_start(launcher: Launcher) -> None:
    plan = plan_of(launcher.tmp, engine=SILENT)
    port = plan.ports[0]
    err = launcher.tmp / "stderr"
    with open(err, "w") as fh:
        p = foreground(launcher, plan, stderr=fh)
    launcher.wait_child_started()
    with answering("127.0.0.1", port):  # after the preflight's port check
        assert p.wait(60) == 1
    assert f"dp0: port {port} answers /health but is held by pid {os.getpid()} (" in err.read_text()
    assert "not by dp0 (pid" in err.read_text()
    assert not launcher.inv.exists() and not launcher.pidfile.exists()
    launcher.assert_all_gone()


# -- 5, 7, 9: stale pidfiles ---------------------------------------------------------------------------


def test_a_launch_refuses_a_pidfile_whose_processes_outlived_their_supervisor(launcher: Launcher) -> None:
    leader, member = standin(launcher.tmp, launcher)
    start, mstart = procs.starttime(leader), procs.starttime(member)
    child = {"name": "sim", "pid": leader, "start": start, "stop_signal": "SIGTERM", "instances": ["dp0"],
             "state": "running", "members": [[member, mstart]]}  # fmt: skip
    write_stale_pidfile(launcher, [child], (leader, (start or 0) + 7))  # its supervisor: gone
    before = launcher.pidfile.read_text()
    r = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(launcher.inv),
                     *sim_ports(1))  # fmt: skip
    assert r.returncode == 1
    pids = ", ".join(map(str, sorted([leader, member])))
    assert (f"{launcher.pidfile}: its supervisor (pid {leader}) is gone but processes it started still run "
            f"(pid {pids}); run 'fdngx stop --inventory {launcher.inv}' first") in r.stderr
    assert launcher.pidfile.read_text() == before
    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    assert gone(leader, start) and gone(member, mstart)


def test_stop_keeps_a_pidfile_that_a_new_launch_wrote_meanwhile(launcher: Launcher,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    leader, member = standin(launcher.tmp, launcher)
    child = {"name": "sim", "pid": member, "start": 1, "stop_signal": "SIGTERM", "instances": ["dp0"],
             "state": "running", "members": [[member, procs.starttime(member)]]}  # fmt: skip
    write_stale_pidfile(launcher, [child], (member, 1))
    # The new launch's supervisor: a live process (the teardown kills what a pidfile names: never pytest).
    newer = {"supervisor": {"pid": leader, "start": procs.starttime(leader)}, "state": "starting", "detached": True,
             "engine": "sim", "inventory": str(launcher.inv), "grace": 2, "children": [], "instances": {}}

    def a_new_launch_meanwhile(*args: Any, **kwargs: Any) -> list[int]:
        launcher.pidfile.write_text(json.dumps(newer))
        return []

    monkeypatch.setattr(procs, "stop_all", a_new_launch_meanwhile)
    stop(launcher.inv, out=io.StringIO())
    assert json.loads(launcher.pidfile.read_text()) == newer


def test_a_pidfile_from_before_a_reboot_names_nothing_of_ours(launcher: Launcher) -> None:
    leader, member = standin(launcher.tmp, launcher)
    start, mstart = procs.starttime(leader), procs.starttime(member)
    child = {"name": "sim", "pid": leader, "start": start, "stop_signal": "SIGTERM", "instances": ["dp0"],
             "state": "running", "members": [[member, mstart]]}  # fmt: skip
    # Same pids and start times as live processes: after a reboot, that is a coincidence, not identity.
    write_stale_pidfile(launcher, [child], (leader, start))
    doc = {**json.loads(launcher.pidfile.read_text()), "boot": "0b5e1e7e-0000-4000-8000-000000000000"}
    launcher.pidfile.write_text(json.dumps(doc))
    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    assert procs.same_process(leader, start) and procs.same_process(member, mstart)  # stop returned: none signalled
    assert "was written before the machine restarted: nothing it names can still run; removed it" in s.stdout
    assert not launcher.pidfile.exists()
    # Nor does it keep a new launch out.
    launcher.pidfile.write_text(json.dumps(doc))
    record = read_pidfile(launcher.pidfile)
    assert live_supervisor(launcher.pidfile) is None and record is not None and record.still_running() == []
    launcher.pidfile.unlink()
    for pid in (leader, member):
        os.kill(pid, signal.SIGKILL)  # the stand-ins, by pid
    # And a pidfile of this boot says so: written by a real launch.
    assert launch(plan_of(launcher.tmp), detach=True, out=io.StringIO()) == 0
    launcher.remember()
    workers(launcher, 0)
    assert json.loads(launcher.pidfile.read_text())["boot"] == procs.boot_id()
    stop(launcher.inv, out=io.StringIO())
    launcher.assert_all_gone()


# -- 8: zombies of reparented workers are reaped while supervising ---------------------------------------


def test_a_reparented_worker_that_exits_is_reaped_at_once(launcher: Launcher) -> None:
    plan = plan_of(launcher.tmp, engine=SHORT_WORKER)
    assert launch(plan, detach=True, out=io.StringIO()) == 0
    launcher.remember()
    sup = json.loads(launcher.pidfile.read_text())["supervisor"]["pid"]
    worker = int((launcher.tmp / "workers-dp0").read_text())
    stat = Path(f"/proc/{worker}/stat")
    with contextlib.suppress(OSError):
        assert int(stat.read_text().rsplit(")", 1)[1].split()[1]) == sup  # reparented to the supervisor
    wait_for(lambda: not stat.exists(), timeout=30, what="the exited worker reaped (no zombie left)")
    stop(launcher.inv, out=io.StringIO())
    launcher.assert_all_gone()
