"""control.py without a running nginx: which error-log lines are the master's, and who counts as the master
behind a pid file when the wall clock moved (decoys are `sleep` processes this test starts and stops)."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest

from fdngx.nginx.control import REFUSED, MasterLog, NginxControl
from fdngx.system import procs
from tests.support import free_ports, stop_process_group, wait_for

MASTER = 4242


def _line(pid: int, level: str, text: str) -> str:
    return f"2026/01/02 03:04:05 [{level}] {pid}#{pid}: {text}\n"


def test_only_the_masters_serious_lines_count(tmp_path: Path) -> None:
    log_path = tmp_path / "error.log"
    log_path.write_text(_line(MASTER, "emerg", "before the reload: not ours to read"))
    log = MasterLog(log_path, MASTER)
    with log_path.open("a") as fh:
        fh.write(_line(4243, "crit", '*7 open() "/srv/x" failed (13: Permission denied), client: 127.0.0.1'))
        fh.write(_line(42, "alert", "a pid that is a prefix of the master's"))
        fh.write(_line(MASTER, "warn", "a warning of the master's: not a refusal"))
        fh.write(f"2026/01/02 03:04:05 [emerg] {MASTER}1#1: a pid the master's is a prefix of\n")
    log.read()
    assert log.error() == ""
    with log_path.open("a") as fh:
        fh.write(_line(MASTER, "emerg", "bind() to 127.0.0.1:8080 failed (98: Address already in use)")[:60])
    log.read()
    assert log.error() == "", "half a line is not read as a line"
    with log_path.open("a") as fh:
        fh.write(_line(MASTER, "emerg", "bind() to 127.0.0.1:8080 failed (98: Address already in use)")[60:])
    log.read()
    assert log.error().endswith(f"[emerg] {MASTER}#{MASTER}: bind() to 127.0.0.1:8080 failed (98: Address already "
                                "in use)"), log.error()
    assert len(log.lines) == 2  # the warning and the bind() line
    assert log.refusal() == log.error()


def test_only_an_emerg_of_the_masters_is_a_refusal(tmp_path: Path) -> None:
    """An [alert] may come before workers that still start (a slow init): not a refusal by itself, but the
    message of a reload that times out."""
    log_path = tmp_path / "error.log"
    log_path.write_text("")
    log = MasterLog(log_path, MASTER)
    with log_path.open("a") as fh:
        fh.write(_line(MASTER, "alert", "lua_code_cache is off; this will hurt performance"))
    log.read()
    assert log.refusal() == "" and "lua_code_cache is off" in log.error()
    with log_path.open("a") as fh:
        fh.write(_line(MASTER, "emerg", 'unknown directive "lisen" in /etc/nginx/conf.d/x.conf:3'))
    log.read()
    assert 'unknown directive "lisen"' in log.refusal()


def test_the_master_log_tells_when_the_master_last_wrote(tmp_path: Path) -> None:
    log_path = tmp_path / "error.log"
    log = MasterLog(log_path, MASTER)  # no log yet
    log.read()
    first = log.changed
    log_path.write_text(_line(4243, "crit", "a worker's line"))
    log.read()
    assert log.changed == first, "a worker's line does not keep the master 'busy'"
    time.sleep(0.01)
    with log_path.open("a") as fh:
        fh.write(_line(MASTER, "emerg", "still could not bind()"))
    log.read()
    assert log.changed > first and "still could not bind()" in log.error()


def test_a_truncated_log_is_read_from_its_start(tmp_path: Path) -> None:
    log_path = tmp_path / "error.log"
    log_path.write_text(_line(1, "info", "x") * 50)
    log = MasterLog(log_path, MASTER)
    log_path.write_text(_line(MASTER, "alert", "after a copytruncate rotation"))
    log.read()
    assert "after a copytruncate rotation" in log.error()


# -- the master behind the pid file --------------------------------------------------------------------


def _pid_file(path: Path, pid: int, age: float) -> Path:
    path.write_text(f"{pid}\n")
    t = time.time() - age
    os.utime(path, (t, t))
    return path


def test_a_clock_stepped_forward_does_not_hide_a_master_that_runs_nginx(
        tmp_path: Path, nginx_titled_decoy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    """The pid file looks an hour older than the process (what a clock stepped forward an hour after nginx
    started looks like): the program file decides. Here the decoy's program is `sleep`: not nginx."""
    control = NginxControl("nginx", pid_file=_pid_file(tmp_path / "nginx.pid", nginx_titled_decoy.pid, 3600))
    assert procs.executable(nginx_titled_decoy.pid) == os.path.realpath(shutil.which("sleep") or "/bin/sleep")
    assert control.master_pid() is None, "a borrowed title is not nginx"
    nginx = os.path.realpath(shutil.which("nginx") or "/usr/sbin/nginx")
    monkeypatch.setattr(procs, "executable", lambda pid: nginx)
    assert control.master_pid() == nginx_titled_decoy.pid, "a master running nginx is recognised whatever the clock"
    # The decoy's title names no -c: nginx's default config. A control for another config is another nginx's.
    other = NginxControl("nginx", conf=tmp_path / "nginx.conf", pid_file=control.pid_file)
    assert other.master_pid() is None, "a reused pid of another nginx (another config) is not ours"
    monkeypatch.setattr(procs, "executable", lambda pid: "/opt/elsewhere/sbin/nginx")
    assert control.master_pid() is None, "another nginx program is not ours"
    monkeypatch.setattr(procs, "executable", lambda pid: None)  # another user's process: unreadable
    assert control.master_pid() is None


def test_a_master_title_names_its_config() -> None:
    control = NginxControl("nginx", prefix=Path("/srv/fdngx"))
    assert control._title_conf("nginx: master process /usr/sbin/nginx") == os.path.realpath("/etc/nginx/nginx.conf")
    assert control._title_conf("nginx: master process nginx -p /a/ -c nginx.conf -g daemon off;") == "/a/nginx.conf"
    assert control._title_conf("nginx: master process nginx -c conf/x.conf") == "/srv/fdngx/conf/x.conf"
    assert control._title_conf("nginx: master process nginx -c /etc/x.conf") == "/etc/x.conf"


def test_a_master_older_than_its_pid_file_needs_no_program_check(
        tmp_path: Path, nginx_titled_decoy: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> None:
    control = NginxControl("nginx", pid_file=_pid_file(tmp_path / "nginx.pid", nginx_titled_decoy.pid, -5))
    monkeypatch.setattr(procs, "executable", lambda pid: None)
    assert control.master_pid() == nginx_titled_decoy.pid


def test_executable_names_a_deleted_program_by_its_path(tmp_path: Path) -> None:
    """A package upgrade replaces /usr/sbin/nginx under a running master: /proc says '<path> (deleted)'."""
    program = tmp_path / "nginx"
    shutil.copy(shutil.which("sleep") or "/bin/sleep", program)
    proc = subprocess.Popen([str(program), "120"], start_new_session=True)
    try:
        wait_for(lambda: procs.executable(proc.pid) == str(program), 10, what="the copy running")
        program.unlink()
        assert os.readlink(f"/proc/{proc.pid}/exe").endswith(" (deleted)")
        assert procs.executable(proc.pid) == str(program)
    finally:
        stop_process_group(proc, grace=2)


def test_a_taken_listen_address_is_named_not_only_still_could_not_bind(tmp_path: Path) -> None:
    """nginx tries bind() five times, logging each failure, then says "still could not bind()" (ngx_cycle.c,
    ngx_open_listening_sockets): that last line alone named neither the address nor why."""
    log_path = tmp_path / "error.log"
    log_path.write_text("")
    log = MasterLog(log_path, MASTER)
    with log_path.open("a") as fh:
        for _ in range(5):
            fh.write(_line(MASTER, "emerg", "bind() to 127.0.0.1:28001 failed (98: Address already in use)"))
        fh.write(_line(MASTER, "emerg", "still could not bind()"))
    log.read()
    want = (f"[emerg] {MASTER}#{MASTER}: bind() to 127.0.0.1:28001 failed (98: Address already in use); "
            f"[emerg] {MASTER}#{MASTER}: still could not bind()")
    assert log.refusal() == want and log.error() == want, log.refusal()


def test_only_a_refused_connection_reads_as_nothing_listening() -> None:
    """A worker out of connections (worker_connections) accepts and closes at once: a busy front door, which the
    reload check read as 'nothing listens' and rolled back after a second (a review: the reload was correct
    and confirmed 6 s later on the old code). Only ECONNREFUSED is REFUSED."""
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(16)
    srv.settimeout(0.1)
    stop = threading.Event()

    def drop() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                srv.accept()[0].close()

    t = threading.Thread(target=drop, daemon=True)
    t.start()
    try:
        url = f"http://127.0.0.1:{srv.getsockname()[1]}/fdngx/generation"
        _, said = NginxControl("nginx", verify_url=url)._answer()
        assert said != REFUSED and said.startswith("was unreachable"), said
    finally:
        stop.set()
        t.join(5)
        srv.close()
    nobody = free_ports(1)[0]
    assert NginxControl("nginx", verify_url=f"http://127.0.0.1:{nobody}/x")._answer() == (None, REFUSED)


def test_a_command_that_runs_past_its_limit_is_said_with_the_limit() -> None:
    """A hung --reload-cmd was 'did not finish in time': which time? (an ops review). The limit is said, and
    that the command was stopped (subprocess.run kills it at its timeout)."""
    def hung(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
        raise subprocess.TimeoutExpired(argv, float(kwargs["timeout"]))  # type: ignore[arg-type]

    control = NginxControl(reload_cmd=["systemctl", "reload", "nginx"], timeout=45.0, runner=hung)
    with pytest.raises(Exception) as err:
        control._run(["systemctl", "reload", "nginx"], "reload")
    assert str(err.value) == "reload: systemctl reload nginx did not finish within 45 s (stopped)"
