"""A launch whose supervisor is gone while its pidfile stays, and where an older fdngx kept that pidfile: a
supervisor killed with kill -9, a terminal that hangs up while a detached launch waits for its replicas, a
launch an older fdngx started through a symlinked inventory. `fdngx status` says it, `fdngx stop` cleans up
after it, and the next `fdngx launch` works. Real processes on 127.0.0.1; every PID a test learns of is
killed by PID at teardown.
"""

from __future__ import annotations

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

from fdngx.domain import Engine
from fdngx.launch import stop as stop_mod
from fdngx.launch.pidfile import (
    ChildRecord,
    ChildState,
    LaunchState,
    Pidfile,
    ProcessRecord,
    read_pidfile,
    write_pidfile,
)
from fdngx.launch.plan import pidfile_for
from fdngx.system import procs
from tests.integration.test_launch import STARTUP, Launcher, sim_ports, standin
from tests.integration.test_launch_faults import SERVES, detached, plan_running, two_names
from tests.integration.test_launch_robust import ENGINE, gone, workers
from tests.integration.test_status import status
from tests.support import wait_for, write_inventory

GONE = "the launch's supervisor (pid {pid}) is not running any more"


def killed(launcher: Launcher) -> int:
    """SIGKILL to the launch's supervisor (as the OOM killer would); its pid once it is gone."""
    record = read_pidfile(launcher.pidfile)
    assert record is not None and record.state is LaunchState.READY
    sup = record.supervisor
    os.kill(sup.pid, signal.SIGKILL)
    wait_for(lambda: not sup.alive(), timeout=30, what=f"supervisor pid {sup.pid} gone")
    return sup.pid


def gone_entries(inv: Path) -> tuple[subprocess.CompletedProcess[str], list[dict[str, Any]]]:
    """`fdngx status` once as a table and once as --json; the JSON's launch_supervisor_gone."""
    shown = status("-i", str(inv))
    assert shown.returncode == 0, shown.stderr
    as_json = status("-i", str(inv), "--json")
    assert as_json.returncode == 0, as_json.stderr
    return shown, json.loads(as_json.stdout).get("launch_supervisor_gone", [])


def test_a_killed_supervisor_is_said_by_status_and_a_new_launch_replaces_its_pidfile(launcher: Launcher) -> None:
    args = ("launch", "--engine", "sim", "-n", "2", "--per-instance", "--detach", "--grace", "1", "--inventory",
            str(launcher.inv))  # fmt: skip
    first = launcher.run(*args, *sim_ports(2))
    assert first.returncode == 0, first.stderr
    launcher.wait_ready(n=2)
    sup = killed(launcher)
    left = read_pidfile(launcher.pidfile)
    assert left is not None
    wait_for(lambda: not left.still_running(), timeout=30, what="the replicas gone with their supervisor")
    shown, [entry] = gone_entries(launcher.inv)
    # before: nothing said, and no launch_supervisor_gone; the inventory still says "running"
    line = f"fdngx: warning: {launcher.inv}: {GONE.format(pid=sup)}: it ended without removing {launcher.pidfile}"
    assert line in shown.stderr, shown.stderr
    assert f"nothing it started runs any more: 'fdngx launch' again ('fdngx stop --inventory {launcher.inv}'" \
        in shown.stderr
    assert {k: entry[k] for k in ("supervisor_pid", "state", "error", "still_running", "pidfile", "legacy_pidfile")} \
        == {"supervisor_pid": sup, "state": "ready", "error": None, "still_running": [], "legacy_pidfile": False,
            "pidfile": str(launcher.pidfile)}  # fmt: skip
    assert f"fdngx: warning: {entry['note']}" in shown.stderr
    # A new launch on the same inventory replaces the pidfile, and says whose.
    again = launcher.run(*args, *sim_ports(2))
    assert again.returncode == 0, again.stderr
    assert (f"fdngx: {launcher.pidfile}: the last launch with this inventory (supervisor pid {sup}) is over: it "
            "ended without removing") in again.stderr  # fmt: skip
    launcher.wait_ready(n=2)
    shown, entries = gone_entries(launcher.inv)
    assert entries == [] and "not running any more" not in shown.stderr
    assert launcher.run("stop", "--inventory", str(launcher.inv)).returncode == 0
    launcher.assert_all_gone()


def test_stop_after_a_killed_supervisor_stops_what_it_left_and_marks_the_inventory(launcher: Launcher) -> None:
    """dp0's worker (a session of its own) and dp1 (ignores SIGTERM, its parent-death signal) outlive the
    supervisor: status names them, a new launch is refused, stop stops them and writes what the supervisor
    would have: dp1 stopped, dp0 exited."""
    plan = plan_running(launcher.tmp, [ENGINE, SERVES])
    plan.procs[1].argv.append("stubborn")
    assert detached(launcher, plan).wait(STARTUP) == 0
    doc = launcher.wait_ready(n=2)
    worker = wait_for(lambda: workers(launcher, 0), timeout=STARTUP, what="dp0's worker")[0]

    def recorded() -> bool:
        record = read_pidfile(launcher.pidfile)
        return record is not None and worker in record.children[0].members

    wait_for(recorded, timeout=STARTUP, what="dp0's worker recorded in the pidfile")
    dp = {i["name"]: i["pid"] for i in doc["instances"]}
    sup = killed(launcher)
    wait_for(lambda: gone(dp["dp0"], launcher.pids[dp["dp0"]]), timeout=30, what="dp0 gone with its supervisor")
    shown, [entry] = gone_entries(launcher.inv)
    assert entry["still_running"] == sorted([worker, dp["dp1"]])
    assert (f"{GONE.format(pid=sup)}: it ended without removing {launcher.pidfile}: killed (kill -9, the OOM killer: "
            "journalctl -k | grep -i oom) or crashed; the inventory's status fields still say what it last saw; "
            f"processes it started still run, unsupervised (pid {', '.join(map(str, sorted([worker, dp['dp1']])))}):"
            f" 'fdngx stop --inventory {launcher.inv}' stops them") in shown.stderr  # fmt: skip
    refused = launcher.run("launch", "--engine", "sim", "-n", "1", "--inventory", str(launcher.inv), *sim_ports(1))
    assert refused.returncode == 1 and "is gone but processes it started still run" in refused.stderr
    assert [i["status"] for i in launcher.inventory()["instances"]] == ["running", "running"]
    s = launcher.run("stop", "--inventory", str(launcher.inv))
    assert s.returncode == 0, s.stderr
    assert f"fdngx: supervisor pid {sup} was not running (stale pidfile)\n" in s.stdout
    assert f"fdngx: killed dp1 pid {dp['dp1']} serving dp1" in s.stdout, s.stdout
    launcher.assert_all_gone()
    assert not launcher.pidfile.exists()
    # before: "running", "running" for good
    assert [i["status"] for i in launcher.inventory()["instances"]] == ["exited", "stopped"]
    shown, entries = gone_entries(launcher.inv)
    assert entries == [] and "not running any more" not in shown.stderr


def test_a_hang_up_while_a_detached_launch_waits_neither_ends_it_nor_hides_the_failure(launcher: Launcher) -> None:
    """SSH drops while `fdngx launch --detach` waits for /health (SIGHUP, then a terminal that answers EIO):
    the launch followed its supervisor to the end of the start; a failure nobody could see is kept in the
    pidfile, said by `fdngx status` and by the next launch."""
    reader, writer = pty.openpty()
    p = subprocess.Popen(launcher.cmd("launch", "--detach", "--inventory", str(launcher.inv), "--engine", "sim",
                                      "-n", "1", "--timeout", "8", "--grace", "1", *sim_ports(1), "--",
                                      "--unhealthy"),
                         cwd=launcher.tmp, stdin=subprocess.DEVNULL, stdout=writer, stderr=writer, text=True,
                         start_new_session=True)  # fmt: skip
    os.close(writer)
    launcher.procs.append(p)  # type: ignore[arg-type]
    launcher.pids[p.pid] = procs.starttime(p.pid)
    def starting() -> bool:
        launcher.remember()
        record = read_pidfile(launcher.pidfile)
        return record is not None and record.instances.get("dp0") == "HTTP 404"

    try:
        wait_for(starting, timeout=STARTUP, interval=0.1, what="the replica answering 404")
    finally:
        os.close(reader)  # the terminal is gone: the next write fails (EIO)
    os.kill(p.pid, signal.SIGHUP)
    sup = read_pidfile(launcher.pidfile)
    assert sup is not None
    assert p.wait(STARTUP) == 1  # before: -SIGHUP at once, while its supervisor went on alone
    launcher.assert_all_gone()
    record = read_pidfile(launcher.pidfile)  # before: its own record, which nothing showed
    assert record is not None and record.state is LaunchState.FAILED and record.error is not None
    assert record.error.startswith("timed out after 8s waiting for /health on dp0 (HTTP 404)")
    said = (f"fdngx: warning: {launcher.inv}: {GONE.format(pid=sup.supervisor.pid)}: the launch failed: timed out "
            "after 8s waiting for /health on dp0 (HTTP 404); stopped every replica; full log: ")  # fmt: skip
    shown = status("-i", str(launcher.inv))  # no inventory: it is written once every replica is healthy
    assert shown.returncode == 1 and shown.stderr.startswith(said), shown.stderr
    assert shown.stderr.splitlines()[1] == f"fdngx: error: {launcher.inv}: inventory file not found (run 'fdngx " \
        "launch' or pass --inventory)"
    launcher.inv.write_text('{"version": 1, "instances": []}\n')  # one an earlier launch left
    shown, [entry] = gone_entries(launcher.inv)
    assert shown.stderr.startswith(said), shown.stderr
    assert entry["state"] == "failed" and entry["error"] == record.error and entry["still_running"] == []
    again = launcher.run("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(launcher.inv),
                         *sim_ports(1))  # fmt: skip
    assert again.returncode == 0, again.stderr
    assert (f"(supervisor pid {sup.supervisor.pid}) is over: the launch failed: timed out after 8s waiting for "
            "/health on dp0 (HTTP 404)") in again.stderr  # fmt: skip
    assert launcher.run("stop", "--inventory", str(launcher.inv)).returncode == 0
    launcher.assert_all_gone()


def symlinked(launcher: Launcher) -> tuple[Path, Path]:
    """etc/fdngx.json -> ../var/fdngx.json; the launcher follows the older fdngx's pidfile, beside the link."""
    link, real = two_names(launcher)
    launcher.inv, launcher.pidfile = link, Path(f"{link}.pid")
    return link, real


@pytest.mark.parametrize("supervisor", ["running", "killed"])
def test_stop_and_status_find_an_older_fdngxs_pidfile_beside_the_symlink(launcher: Launcher,
                                                                         supervisor: str) -> None:
    link, real = symlinked(launcher)
    plan = plan_running(launcher.tmp, [SERVES, SERVES])
    plan.procs[1].argv.append("stubborn")  # outlives a killed supervisor
    plan.inventory_path, plan.pidfile = str(link), f"{link}.pid"  # where an older fdngx kept it
    assert detached(launcher, plan).wait(STARTUP) == 0
    pids = [i["pid"] for i in launcher.wait_ready(n=2)["instances"]]
    said = (f"fdngx: {link}.pid: an older fdngx's pidfile, beside the symlink's name (pidfiles are now kept beside "
            f"the file it points to, {real}.pid)")  # fmt: skip
    if supervisor == "killed":
        sup = killed(launcher)
        shown, [entry] = gone_entries(link)
        assert entry["legacy_pidfile"] is True and entry["pidfile"] == f"{link}.pid"
        assert (f"{GONE.format(pid=sup)} (its pidfile {link}.pid: an older fdngx's, beside the symlink's name)"
                in shown.stderr)  # fmt: skip
    s = launcher.run("stop", "--inventory", str(link))
    assert s.returncode == 0, s.stderr
    # before: "nothing to stop: no supervisor pidfile .../var/fdngx.json.pid", and the replicas ran on
    assert s.stdout.startswith(f"{said}: stopping the launch it names\n"), s.stdout
    assert f"killed dp1 pid {pids[1]} serving dp1" in s.stdout
    launcher.assert_all_gone()
    assert not Path(f"{link}.pid").exists()
    assert launcher.inventory()["instances"][1]["status"] == "stopped"


def test_a_launch_through_the_symlink_is_refused_while_an_older_fdngxs_launch_runs(launcher: Launcher) -> None:
    """The older fdngx's launch lock was beside the link too: only its pidfile tells that it runs."""
    link, real = symlinked(launcher)
    old, member = standin(launcher.tmp, launcher)  # its supervisor
    record = {"supervisor": {"pid": old, "start": procs.starttime(old)}, "state": "ready", "detached": True,
              "engine": "sim", "inventory": str(link), "grace": 1, "children": [], "instances": {}}  # fmt: skip
    Path(f"{link}.pid").write_text(json.dumps(record))
    args = ("launch", "--engine", "sim", "-n", "1", "--detach", "--inventory", str(link))
    launcher.pidfile = Path(f"{real}.pid")  # where a launch it should not have started would be recorded
    r = launcher.run(*args, *sim_ports(1))
    assert r.returncode == 1, r.stderr  # before: 0, a second launch writing the same inventory
    assert r.stderr.splitlines() == [
        f"fdngx: error: {link}.pid: replicas launched with this inventory are still supervised by pid {old} (an "
        f"older fdngx's pidfile, beside the symlink's name); run 'fdngx stop --inventory {link}' first"]
    for pid in (old, member):
        os.kill(pid, signal.SIGKILL)  # the stand-in, by pid
    next(p for p in launcher.procs if p.pid == old).wait(30)
    r = launcher.run(*args, *sim_ports(1))
    assert r.returncode == 0, r.stderr
    assert f"fdngx: {link}.pid: the last launch with this inventory (supervisor pid {old}) is over" in r.stderr
    assert not Path(f"{link}.pid").exists() and launcher.pidfile.exists()
    assert launcher.run("stop", "--inventory", str(link)).returncode == 0
    launcher.assert_all_gone()


def test_stop_that_must_kill_the_supervisor_marks_the_inventory_itself(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """A supervisor that does not exit in time (hung, SIGTERM ignored) is killed by `fdngx stop`, which then
    writes what it would have: its replicas "stopped". Before, the inventory said "running" for good, and stop
    said so ("the inventory may still say running"). Real processes, stopped by PID; the waits made short."""
    monkeypatch.setattr(stop_mod, "ACK_WAIT", 0.2)
    monkeypatch.setattr(stop_mod, "EXIT_WAIT", 0.3)
    monkeypatch.setattr(stop_mod, "STOP_MARGIN", 0.1)
    hung = subprocess.Popen([sys.executable, "-c", "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)"
                             "\nprint('ready', flush=True)\ntime.sleep(120)"], stdout=subprocess.PIPE, text=True)
    replica = subprocess.Popen(["sleep", "120"], start_new_session=True)
    try:
        assert hung.stdout is not None and hung.stdout.readline() == "ready\n"  # SIGTERM ignored from here on
        inv = write_inventory(tmp_path / "fdngx.json", [{"name": "dp0", "host": "127.0.0.1", "port": 1,
                                                         "metrics_port": 2, "status": "running", "pid": replica.pid}])
        child = ChildRecord("dp0", replica.pid, procs.starttime(replica.pid), "SIGTERM", ["dp0"], ChildState.RUNNING)
        write_pidfile(pidfile_for(inv), Pidfile(
            supervisor=ProcessRecord(hung.pid, procs.starttime(hung.pid)), state=LaunchState.READY, detached=True,
            engine=Engine.SIM, inventory=str(inv), grace=0.2, children=[child], instances={}, boot=procs.boot_id()))
        said = stop_mod.stop(inv, out=io.StringIO(), grace=0.2)
        assert said[0] == f"supervisor pid {hung.pid} did not exit in time: killed", said
        assert hung.wait(timeout=10) == -signal.SIGKILL and replica.wait(timeout=10) is not None
        assert [i["status"] for i in json.loads(inv.read_text())["instances"]] == ["stopped"], said
        assert not Path(pidfile_for(inv)).exists()
    finally:
        for p in (hung, replica):
            if p.poll() is None:
                p.kill()
                p.wait(timeout=10)
