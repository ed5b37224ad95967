"""`fdngx launch` told apart from its neighbours: the listener a /health answer came from (by the address it
reached, not any on the port), a supervisor whose output has no room, and a detached supervisor that cannot
write the inventory (said where the user looks, not only in supervisor.log). Real sockets on 127.0.0.x and
::1, real files; every PID a test learns of is killed by PID at teardown.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import select
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from fdngx.domain import Engine, Instance, Inventory, Restart
from fdngx.engines.argv import ProcSpec
from fdngx.launch.output import HOLD, Out
from fdngx.launch.pidfile import read_pidfile, unwritten_lines
from fdngx.launch.plan import Plan
from fdngx.launch.probe import foreign_listener, health
from tests.integration.test_full_disk import fill, tmpfs
from tests.integration.test_launch import STARTUP, Launcher, sim_ports
from tests.integration.test_launch import health as inst_health
from tests.integration.test_launch_robust import RUN_PLAN, replace_with_dir
from tests.support import REPO, answering, free_ports, wait_for

# Somebody else's listeners: each argument family/address/v6only on one port, SO_REUSEPORT (so that a
# wildcard and a specific address share it, as two servers of one account may).
LISTENERS = """
import socket, sys, time
port = int(sys.argv[1])
held = []
for spec in sys.argv[2:]:
    fam, addr, v6only = spec.split("/")
    s = socket.socket(socket.AF_INET6 if fam == "6" else socket.AF_INET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    if fam == "6":
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, int(v6only))
    s.bind((addr, port)); s.listen(); held.append(s)
print("listening", flush=True)
time.sleep(600)
"""

# A replica that listens on argv[2] only once the file argv[3] exists: the test puts somebody else's server
# on the same port first (after the preflight's port check, which would refuse it).
GATED = """
import http.server, os, sys, time
port, host, go = int(sys.argv[1]), sys.argv[2], sys.argv[3]
while not os.path.exists(go):
    time.sleep(0.05)
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    def log_message(self, *a):
        pass
http.server.HTTPServer((host, port), H).serve_forever()
"""


@contextlib.contextmanager
def theirs(port: int, *specs: str) -> Iterator[int]:
    """Listeners of another process (not ours, not a launch's): yields its pid; killed by it at the end."""
    p = subprocess.Popen([sys.executable, "-c", LISTENERS, str(port), *specs], stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout is not None and p.stdout.readline().strip() == "listening"
        yield p.pid
    finally:
        p.kill()
        p.wait(10)


def ours(family: int, addr: str, port: int) -> socket.socket:
    s = socket.socket(family)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    s.bind((addr, port))
    s.listen()
    return s


def reaches(sock: socket.socket, family: int, addr: str, port: int) -> bool:
    """Does a connection to addr:port land on `sock`? (The kernel's own answer, to check the model against.)"""
    with socket.create_connection((addr, port), timeout=5):
        ready, _, _ = select.select([sock], [], [], 0.5)
    if ready:
        sock.accept()[0].close()
    return bool(ready)


# -- 1: the listener that answered is the one on the address the probe reached --------------------------


def test_only_the_listener_a_connection_reaches_is_judged() -> None:
    port = free_ports(1)[0]
    me = {os.getpid()}
    # Ours on 127.0.0.1, theirs on 127.0.0.2 and on the wildcards (0.0.0.0, dual-stack ::).
    mine = ours(socket.AF_INET, "127.0.0.1", port)
    try:
        with theirs(port, "4/127.0.0.2/0", "4/0.0.0.0/0", "6/::/0") as pid:
            assert reaches(mine, socket.AF_INET, "127.0.0.1", port)
            assert foreign_listener("127.0.0.1", port, me) is None  # before: their 127.0.0.2 one counted
            assert foreign_listener("::ffff:127.0.0.1", port, me) is None  # the mapped form is the same address
            assert not reaches(mine, socket.AF_INET, "127.0.0.2", port)
            assert f"pid {pid} (" in (foreign_listener("127.0.0.2", port, me) or "")
            assert not reaches(mine, socket.AF_INET, "127.0.0.3", port)  # theirs on 0.0.0.0 takes it
            assert f"pid {pid} (" in (foreign_listener("127.0.0.3", port, me) or "")
            assert f"pid {pid} (" in (foreign_listener("::1", port, me) or "")  # their :: takes ::1
            assert foreign_listener("127.0.0.1", port, set()) is not None  # ours only when its process is
    finally:
        mine.close()
    # The reverse: theirs on 127.0.0.1 only, ours on 127.0.0.2 and ::1.
    mine4, mine6 = ours(socket.AF_INET, "127.0.0.2", port), ours(socket.AF_INET6, "::1", port)
    try:
        with theirs(port, "4/127.0.0.1/0") as pid:
            assert foreign_listener("127.0.0.2", port, me) is None
            assert foreign_listener("::1", port, me) is None
            assert f"pid {pid} (" in (foreign_listener("127.0.0.1", port, me) or "")
            assert foreign_listener("127.0.0.4", port, me) is None  # nothing listens for it: refused, not theirs
    finally:
        mine4.close()
        mine6.close()


def gated_plan(tmp: Path, host: str) -> Plan:
    port, metrics = free_ports(2)
    spec = ProcSpec("dp0", [sys.executable, "-c", GATED, str(port), host, str(tmp / "go")], {},
                    str(tmp / "logs" / "dp0.log"), ["dp0"])
    inv = Inventory([Instance("dp0", host, port, metrics, Engine.SIM)])
    return Plan(Engine.SIM, [spec], inv, str(tmp / "fdngx.json"), str(tmp / "logs"), [port], 30.0, Restart.NO, 5.0,
                False, bind_host=host)


@pytest.mark.parametrize(("mine", "other"), [("127.0.0.1", "127.0.0.2"), ("127.0.0.2", "127.0.0.1")])
def test_somebody_elses_server_on_another_local_address_does_not_fail_the_start(launcher: Launcher, mine: str,
                                                                                other: str) -> None:
    plan = gated_plan(launcher.tmp, mine)
    port = plan.ports[0]
    err = launcher.tmp / "stderr"
    with open(err, "w") as fh:
        p = subprocess.Popen([sys.executable, "-c", RUN_PLAN, json.dumps(plan.to_dict())], cwd=REPO,
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=fh, text=True,
                             start_new_session=True)  # fmt: skip
    launcher.procs.append(p)

    launcher.wait_child_started()
    with answering(other, port):  # after the preflight's check of the port
        (launcher.tmp / "go").touch()
        doc = launcher.wait_ready(p, 1)  # before: "port N answers /health but is held by pid <this test>"
        assert doc["instances"][0]["host"] == mine and inst_health(doc["instances"][0])
        h = health(mine, port)
        assert h.ok and h.peer == mine
        os.kill(p.pid, signal.SIGTERM)
        assert p.wait(60) == 0, err.read_text()
    assert "held by" not in err.read_text()
    launcher.assert_all_gone()


# -- 2: output with no room: not tried for every line, not given up on for good ------------------------


def test_a_full_disk_under_the_output_holds_lines_back_then_says_what_is_missing(tmp_path: Path) -> None:
    now = [0.0]
    first = "fdngx: first".ljust(os.sysconf("SC_PAGE_SIZE") - 1, ".") + "\n"  # its page full: no slack left
    with tmpfs(tmp_path / "small", "64k") as disk:
        log = disk / "supervisor.log"
        with open(log, "w") as stream:
            out = Out(stream, clock=lambda: now[0])
            assert out.write(first)
            filler = fill(disk)
            assert not out.line("fdngx: lost 1")  # tried: ENOSPC
            assert (out.lost, out.why, out.broken) == (1, os.strerror(errno.ENOSPC), False)
            assert not out.line("fdngx: lost 2")  # held back: not tried for every line (before: tried, and failed)
            assert out.lost == 2
            filler.unlink()
            now[0] += HOLD  # room again, and time to try: the next line gets out, after a word on the gap
            assert out.line("fdngx: after") and out.lost == 0
            assert out.line("fdngx: more")
        text = log.read_text()
    assert text.startswith(first) and text.endswith("fdngx: after\nfdngx: more\n"), text
    assert "fdngx: up to 2 line(s) of output missing here (No space left on device)" in text, text
    assert "lost 2" not in text


# -- 3: a detached supervisor that cannot write the inventory says so where the user looks -------------


def test_a_detached_launch_that_cannot_write_its_inventory_says_so_and_records_it(launcher: Launcher) -> None:
    ports = sim_ports(2)
    p = subprocess.Popen(launcher.cmd("launch", "--engine", "sim", "-n", "2", "--per-instance", "--detach",
                                      "--inventory", str(launcher.inv), *ports, "--", "--unhealthy"),
                         cwd=launcher.tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    launcher.procs.append(p)

    def answering_404() -> bool:
        launcher.remember()
        record = read_pidfile(launcher.pidfile)
        return record is not None and set(record.instances.values()) == {"HTTP 404"}

    wait_for(answering_404, timeout=STARTUP, interval=0.2, what="both replicas answering 404")
    # The inventory's path is taken by a directory once the launch has started (a launch refuses one
    # before): every write of it fails.
    launcher.inv.mkdir()
    for port in ports[3].split(","):
        requests.post(f"http://127.0.0.1:{port}/sim/fault", json={"unhealthy": False}, timeout=10).raise_for_status()
    _out, err = p.communicate(timeout=STARTUP)
    r = subprocess.CompletedProcess(p.args, p.returncode, _out, err)
    assert r.returncode == 0, r.stderr
    record = read_pidfile(launcher.pidfile)
    assert record is not None
    launcher.pids.update({c.pid: c.start for c in record.children if c.pid})
    why = record.unwritten.get(str(launcher.inv))
    assert why, record  # before: only supervisor.log said it
    [line] = unwritten_lines(record)  # what `fdngx status` can say
    assert line.startswith(f"warning: {launcher.inv}: the launch's supervisor (pid {record.supervisor.pid}) cannot "
                           f"write it ({why})")  # fmt: skip
    assert f"fdngx: {line}" in r.stderr
    assert f"inventory {launcher.inv} NOT written yet" in r.stderr
    launcher.inv.rmdir()  # room again: written at its next loop, and the record goes
    wait_for(lambda: launcher.inv.is_file() and not read_pidfile(launcher.pidfile).unwritten, timeout=30,
             what="the inventory written and the pidfile's record of it gone")  # fmt: skip
    doc = launcher.inventory()
    # It becomes unwritable while the launch runs: a replica dies, the inventory cannot say so.
    replace_with_dir(launcher.inv)
    os.kill(doc["instances"][0]["pid"], signal.SIGKILL)
    wait_for(lambda: str(launcher.inv) in read_pidfile(launcher.pidfile).unwritten, timeout=30,
             what="the pidfile recording the failed write")  # fmt: skip
    assert unwritten_lines(read_pidfile(launcher.pidfile))[0].startswith(f"warning: {launcher.inv}: ")
    assert inst_health(doc["instances"][1])
    launcher.inv.rmdir()
    wait_for(lambda: launcher.inv.is_file() and not read_pidfile(launcher.pidfile).unwritten, timeout=30,
             what="the inventory written again")  # fmt: skip
    assert [i["status"] for i in launcher.inventory()["instances"]] == ["exited", "running"]
    assert launcher.run("stop", "--inventory", str(launcher.inv)).returncode == 0
    launcher.assert_all_gone()
