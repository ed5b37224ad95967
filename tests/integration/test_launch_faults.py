"""`fdngx launch` / `fdngx stop` under the faults of an outside review: a supervisor killed while its replicas
start, hang-ups under nohup, a full inventory directory, `fdngx stop --grace`, symlinked and mistaken
inventory paths, a rank that comes back. Real `fdngx sim` processes (or stand-ins) on 127.0.0.1; every PID a
test learns of is killed by PID at teardown.
"""

from __future__ import annotations

import functools
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from fdngx.domain import Engine, Instance, Inventory, Restart
from fdngx.engines.argv import ProcSpec
from fdngx.launch.pidfile import read_pidfile
from fdngx.launch.plan import Plan
from fdngx.system import procs
from tests.integration.test_full_disk import fill, tmpfs
from tests.integration.test_launch import STARTUP, Launcher, health, sim_ports
from tests.integration.test_launch_robust import ENGINE, foreground, plan_of, workers
from tests.support import REPO, free_ports, wait_for

# A replica whose API port stops listening on GET /close (its process keeps running) and listens again once
# the file argv[2] exists.
FLAPS = """
import http.server, os, sys, threading, time
port, gate = int(sys.argv[1]), sys.argv[2]
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
        if self.path == "/close":
            threading.Thread(target=close).start()
    def log_message(self, *a):
        pass
def serve():
    s = http.server.HTTPServer(("127.0.0.1", port), H)
    threading.Thread(target=s.serve_forever, daemon=True).start()
    return s
def close():
    global srv
    srv.shutdown(); srv.server_close()
    while not os.path.exists(gate):
        time.sleep(0.05)
    srv = serve()
srv = serve()
threading.Event().wait()
"""

# Never listens, and ignores SIGTERM (the parent-death signal too): a rank busy loading. Writes argv[2] once
# it ignores it.
HANGS = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); " \
        "open(sys.argv[2], 'w').write('ignoring'); time.sleep(600)"

# A detached launch of a plan, in a process of its own (the test plays the terminal).
RUN_DETACHED = (
    "import json, sys\n"
    "from fdngx.errors import FdngxError\n"
    "from fdngx.launch.plan import Plan\n"
    "from fdngx.launch.run import launch\n"
    "try:\n"
    "    sys.exit(launch(Plan.from_dict(json.loads(sys.argv[1])), detach=True))\n"
    "except FdngxError as exc:\n"
    "    print(f'fdngx: error: {exc}', file=sys.stderr)\n"
    "    sys.exit(1)\n"
)


def plan_running(tmp: Path, engines: list[str], grace: float = 1.0, timeout: float = 120.0) -> Plan:
    """One process per replica dp<i>, running engines[i] with its port and the file argv[2]."""
    n = len(engines)
    ports = [int(p) for p in free_ports(2 * n)]
    specs = [ProcSpec(f"dp{i}", [sys.executable, "-c", engine, str(ports[i]), str(tmp / f"workers-dp{i}")], {},
                      str(tmp / "logs" / f"dp{i}.log"), [f"dp{i}"]) for i, engine in enumerate(engines)]
    inv = Inventory([Instance(f"dp{i}", "127.0.0.1", ports[i], ports[n + i], Engine.SIM) for i in range(n)])
    return Plan(Engine.SIM, specs, inv, str(tmp / "fdngx.json"), str(tmp / "logs"), ports[:n], timeout,
                Restart.NO, grace, False)


def detached(launcher: Launcher, plan: Plan) -> subprocess.Popen[str]:
    p = subprocess.Popen([sys.executable, "-c", RUN_DETACHED, json.dumps(plan.to_dict())], cwd=REPO,
                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    launcher.procs.append(p)
    launcher.pids[p.pid] = procs.starttime(p.pid)
    return p


# A replica answering /health 200 on argv[1]; with a third argument "stubborn" it ignores SIGTERM.
SERVES = """
import http.server, signal, sys
if sys.argv[3:] == ["stubborn"]:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H).serve_forever()
"""

# Ignores SIGTERM (a replica busy loading, or one that never handles it); says when it does.
IGNORES_TERM = "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); " \
               "time.sleep(600)"


def test_a_group_leader_killed_after_the_grace_is_named_once(launcher: Launcher) -> None:
    p = subprocess.Popen([sys.executable, "-c", IGNORES_TERM], stdout=subprocess.PIPE, text=True,
                         start_new_session=True)  # fmt: skip
    launcher.procs.append(p)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready"
    start = procs.starttime(p.pid)
    assert start is not None
    # The leader is its group (pgid == pid) and in the snapshot of descendants: one kill, said once.
    killed = procs.stop_all([(p.pid, start, "SIGTERM")], [p], 0.5, {p.pid: start})
    assert killed == [p.pid]  # before: [pid, pid] ("killed after the grace period: 8182, 8182")
    assert p.wait(10) == -signal.SIGKILL


def test_an_inventory_path_that_is_a_directory_is_refused_before_anything_starts(launcher: Launcher) -> None:
    launcher.inv.mkdir()  # -i /var/lib/fdngx: a directory, not the file in it
    r = launcher.run("launch", "--engine", "sim", "-n", "2", "--detach", "--inventory", str(launcher.inv),
                     *sim_ports(2))  # fmt: skip
    assert r.returncode == 1, r.stderr  # before: 0, a supervisor retrying the write forever
    [line] = r.stderr.splitlines()
    assert line == (f"fdngx: error: {launcher.inv}: is a directory; --inventory names the inventory file (e.g. "
                    f"{launcher.inv / 'fdngx.json'}); nothing was started")  # fmt: skip
    assert not Path(f"{launcher.inv}.pid").exists() and not (launcher.tmp / "fdngx-logs").exists()


def two_names(launcher: Launcher) -> tuple[Path, Path]:
    """One inventory under two names: etc/fdngx.json -> ../var/fdngx.json (an empty one); (link, real)."""
    (launcher.tmp / "var").mkdir()
    (launcher.tmp / "etc").mkdir()
    real = launcher.tmp / "var" / "fdngx.json"
    real.write_text('{"version": 1, "instances": []}\n')
    link = launcher.tmp / "etc" / "fdngx.json"
    link.symlink_to("../var/fdngx.json")
    return link, real


def test_two_names_of_one_inventory_share_one_lock_and_one_pidfile(launcher: Launcher) -> None:
    link, real = two_names(launcher)
    launcher.inv = real

    def remember() -> None:
        for pidfile in (Path(f"{link}.pid"), Path(f"{real}.pid")):  # before: one beside each name
            launcher.pidfile = pidfile
            launcher.remember()

    first = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(link), *sim_ports(1))
    remember()
    assert first.returncode == 0, first.stderr
    second = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(real),
                          *sim_ports(1))  # fmt: skip
    remember()
    assert second.returncode == 1, second.stderr  # before: 0, and the first launch's replica left the inventory
    [line] = second.stderr.splitlines()
    assert line.startswith(f"fdngx: error: {real}.pid: replicas launched with this inventory are still supervised")
    assert not Path(f"{link}.pid").exists()
    stopped = launcher.run("stop", "--inventory", str(real))  # the other name finds it too
    assert stopped.returncode == 0 and "stopped supervisor pid" in stopped.stdout, stopped.stdout + stopped.stderr
    launcher.assert_all_gone()
    assert link.is_symlink() and [i["status"] for i in launcher.inventory()["instances"]] == ["stopped"]


def ignored_signals(pid: int) -> set[int]:
    """The signals `pid` ignores (SigIgn of /proc/<pid>/status, a bit mask: bit n-1 is signal n)."""
    mask = next(int(line.split()[1], 16) for line in Path(f"/proc/{pid}/status").read_text().splitlines()
                if line.startswith("SigIgn:"))  # fmt: skip
    return {n for n in range(1, 65) if mask & (1 << (n - 1))}


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGINT], ids=["SIGHUP", "SIGINT"])
def test_a_signal_ignored_at_start_stays_ignored_and_stops_nothing(launcher: Launcher, sig: int) -> None:
    """`nohup fdngx launch ... &` (SIGHUP ignored), a script's `fdngx launch ... &` (SIGINT ignored): the
    terminal hanging up, or a Ctrl-C meant for the shell, must not stop the replicas."""
    err = launcher.tmp / "err"
    with open(err, "w") as fh:
        p = subprocess.Popen(launcher.cmd("launch", "--inventory", str(launcher.inv), "--engine", "sim", "-n", "2",
                                          "--per-instance", *sim_ports(2)),
                             cwd=launcher.tmp, stdout=subprocess.DEVNULL, stderr=fh, text=True, start_new_session=True,
                             preexec_fn=functools.partial(signal.signal, sig, signal.SIG_IGN))  # fmt: skip
    launcher.procs.append(p)
    launcher.pids[p.pid] = procs.starttime(p.pid)
    doc = launcher.wait_ready(p, 2)
    assert sig in ignored_signals(p.pid)  # before: its own handler replaced the ignored disposition
    os.kill(p.pid, sig)  # the hang-up (or the Ctrl-C): discarded, since ignored
    assert p.poll() is None and all(health(i) for i in doc["instances"])
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    text = err.read_text()
    name = signal.Signals(sig).name
    assert f"fdngx: {name} was ignored when fdngx started (nohup, or a background job): it stays ignored" in text
    assert "fdngx: SIGTERM: stopped every replica" in text and f"{name}: stopped" not in text
    launcher.assert_all_gone()


def test_a_rank_that_listens_again_is_running_again(launcher: Launcher) -> None:
    plan = plan_of(launcher.tmp, 1, engine=FLAPS)  # --restart no: nothing restarts it
    gate = launcher.tmp / "workers-dp0"
    err = launcher.tmp / "err"
    with open(err, "w") as fh:
        p = foreground(launcher, plan, fh)
    inst = launcher.wait_ready(p, 1)["instances"][0]
    requests.get(f"http://127.0.0.1:{inst['port']}/close", timeout=10)

    def status() -> str:
        return str(launcher.inventory()["instances"][0]["status"])

    wait_for(lambda: status() == "down", timeout=STARTUP, interval=0.2, what="dp0 down in the inventory")
    gate.touch()  # it listens again
    # before: "down" for good, and nothing said
    wait_for(lambda: status() == "running", timeout=STARTUP, interval=0.2, what="dp0 running again")
    assert f"fdngx: dp0 of dp0 (pid {inst['pid']}) is healthy again (/health answers 200)" in err.read_text()
    os.kill(p.pid, signal.SIGTERM)
    assert p.wait(60) == 0
    launcher.assert_all_gone()


def test_a_detached_supervisor_killed_while_starting_leaves_nothing_running(launcher: Launcher) -> None:
    """The OOM killer takes the supervisor while dp1 still loads and ignores SIGTERM (its parent-death signal):
    the launch stops what it left (dp1, and dp0's worker in a session of its own), then fails saying so."""
    plan = plan_running(launcher.tmp, [ENGINE, HANGS])
    p = detached(launcher, plan)

    def loading() -> int | None:
        launcher.remember()
        record = read_pidfile(launcher.pidfile)
        ready = record is not None and record.instances.get("dp0") == "healthy" and all(
            c.pid for c in record.children) and (launcher.tmp / "workers-dp1").exists()
        return record.supervisor.pid if ready and record is not None else None

    sup = wait_for(loading, timeout=STARTUP, interval=0.1, what="dp0 healthy, dp1 ignoring SIGTERM")
    workers(launcher, 0)
    os.kill(sup, signal.SIGKILL)
    assert p.wait(60) == 1
    err = p.stderr.read() if p.stderr else ""
    [line] = [x for x in err.splitlines() if "error" in x]
    assert line.startswith(f"fdngx: error: the supervisor (pid {sup}) was killed by SIGKILL before every replica "
                           "was healthy; stopped the ")  # fmt: skip
    assert "killed after the grace period" in line, err
    launcher.assert_all_gone()  # before: dp1 outlived it, where `fdngx stop` could not find it
    assert not launcher.pidfile.exists()


def remember_supervisor(launcher: Launcher, err: str) -> None:
    """The supervisor pid a detached launch printed, for the teardown (its pidfile may not be written)."""
    for pid in map(int, re.findall(r"supervisor pid (\d+)", err)):
        launcher.pids.setdefault(pid, procs.starttime(pid))


def test_a_detached_launch_with_a_full_inventory_directory_returns_when_healthy(launcher: Launcher) -> None:
    """No room for the pidfile or the inventory: the replicas are healthy all the same; the launch says so at
    once, and why the files are missing, instead of stopping them after timeout + grace + 30 s."""
    with tmpfs(launcher.tmp / "inv", "256k") as inv_dir:
        launcher.inv, launcher.pidfile = inv_dir / "fdngx.json", inv_dir / "fdngx.json.pid"
        filler = fill(inv_dir)
        r = launcher.run("launch", "--engine", "sim", "-n", "2", "--per-instance", "--detach", "--timeout", "5",
                         "--grace", "1", "--inventory", str(launcher.inv), "--log-dir", str(launcher.tmp / "logs"),
                         *sim_ports(2))  # fmt: skip
        remember_supervisor(launcher, r.stderr)
        assert r.returncode == 0, r.stderr  # before: 1, "the supervisor did not report ready in time; stopped it"
        [sup] = {int(x) for x in re.findall(r"supervisor pid (\d+)", r.stderr)}
        for path in (launcher.inv, launcher.pidfile):
            assert (f"fdngx: warning: {path}: the launch's supervisor (pid {sup}) cannot write it (No space left on "
                    "device; the file is unchanged)") in r.stderr  # fmt: skip
        assert (f"supervisor pid {sup} (pidfile {launcher.pidfile} NOT written yet (see above): until it is, fdngx "
                f"stop cannot find it; kill -TERM {sup} stops every replica)") in r.stderr  # fmt: skip
        filler.unlink()  # room again: both are written at the supervisor's next loop
        doc = launcher.wait_ready(n=2)
        assert all(health(i) for i in doc["instances"])
        stopped = launcher.run("stop", "--inventory", str(launcher.inv))
        assert stopped.returncode == 0, stopped.stderr
        launcher.assert_all_gone()


def test_a_detached_launch_whose_logs_have_no_room_says_why_it_failed(launcher: Launcher) -> None:
    with tmpfs(launcher.tmp / "inv", "256k") as inv_dir:
        launcher.inv, launcher.pidfile = inv_dir / "fdngx.json", inv_dir / "fdngx.json.pid"
        (inv_dir / "fdngx-logs").mkdir()
        fill(inv_dir)
        r = launcher.run("launch", "--engine", "sim", "-n", "2", "--per-instance", "--detach", "--timeout", "5",
                         "--grace", "1", "--inventory", str(launcher.inv), *sim_ports(2))  # fmt: skip
        remember_supervisor(launcher, r.stderr)
        assert r.returncode == 1, r.stderr
        [line] = [x for x in r.stderr.splitlines() if "error" in x]
        # before: "the supervisor exited with status 1; see .../supervisor.log", a log with no room, empty
        assert line == (f"fdngx: error: cannot start dp0: No space left on device; stopped every replica; full log: "
                        f"{inv_dir / 'fdngx-logs' / 'dp0.log'}")  # fmt: skip
        launcher.assert_all_gone()
        assert not launcher.pidfile.exists()


@pytest.mark.parametrize(("launch_grace", "stop_grace"), [(30.0, "2"), (30.0, "0"), (1.0, None)],
                         ids=["stop-grace-2", "stop-grace-0", "launch-grace-1"])
def test_stop_grace_is_the_grace_and_killed_replicas_are_said_killed(launcher: Launcher, launch_grace: float,
                                                                     stop_grace: str | None) -> None:
    """dp1 ignores SIGTERM. `fdngx stop --grace N` waited the supervisor's own grace, and with --grace 0 killed
    the supervisor mid-stop (the inventory still said running); `fdngx stop` said "stopped dp1" of a replica
    the supervisor had to SIGKILL."""
    plan = plan_running(launcher.tmp, [SERVES, SERVES], grace=launch_grace)
    plan.procs[1].argv.append("stubborn")
    p = detached(launcher, plan)
    assert p.wait(STARTUP) == 0, p.stderr.read() if p.stderr else ""
    pids = {i["name"]: i["pid"] for i in launcher.wait_ready(n=2)["instances"]}
    sup = launcher.inventory() and read_pidfile(launcher.pidfile)
    assert sup is not None
    r = launcher.run("stop", "--inventory", str(launcher.inv), *(["--grace", stop_grace] if stop_grace else []))
    assert r.returncode == 0, r.stderr
    # before: the supervisor killed after stop's grace + 15 s, its own (30 s) running; the inventory "running"
    assert f"fdngx: stopped supervisor pid {sup.supervisor.pid}" in r.stdout, r.stdout
    assert [i["status"] for i in launcher.inventory()["instances"]] == ["stopped", "stopped"]
    assert f"fdngx: killed dp1 pid {pids['dp1']} serving dp1" in r.stdout  # before: "stopped", its grace being 1 s
    dp0 = ("stopped", "killed") if stop_grace == "0" else ("stopped",)  # 0: SIGKILL as soon as it is asked
    assert any(f"fdngx: {how} dp0 pid {pids['dp0']} serving dp0" in r.stdout for how in dp0), r.stdout
    grace = stop_grace or f"{launch_grace:g}"
    assert f"stopping supervisor pid {sup.supervisor.pid} (grace {grace}s)" in r.stderr
    launcher.assert_all_gone()
    log = (launcher.tmp / "logs" / "supervisor.log").read_text()
    said = re.findall(r"killed after the grace period: ([\d, ]+)", log)
    assert len(said) == 1 and str(pids["dp1"]) in said[0].split(", "), log
    if stop_grace:
        assert f"(grace {stop_grace}s, asked by fdngx stop pid " in log
    assert not launcher.pidfile.exists() and not Path(f"{launcher.pidfile}.stop").exists()


def test_a_launch_lock_that_cannot_be_created_is_not_called_a_file_to_remove(launcher: Launcher) -> None:
    with tmpfs(launcher.tmp / "ro", "64k") as ro:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True, capture_output=True)
        r = launcher.run("launch", "--engine", "sim", "-n", "1", "--inventory", str(ro / "fdngx.json"),
                         *sim_ports(1))  # fmt: skip
    assert r.returncode == 1, r.stderr
    # before: "cannot open the launch lock (Read-only file system); remove it if it is not a file of yours"
    assert r.stderr.splitlines() == [f"fdngx: error: {ro / '.fdngx.json.launch.lock'}: cannot create the launch "
                                     "lock (Read-only file system); nothing was started"]  # fmt: skip
