"""A stale nginx pid file whose pid was reused (issue 10: fdngx SIGHUPed an unrelated process).

fdngx signals a master only when its command line is nginx's master title and it started no later than
the pid file was written. The decoys here are processes this test starts (`sleep`, SIGHUP kills it), and
are stopped by PID. A pid file that names nobody sensible (0, -1, 1, garbage, a FIFO) never leads to a
signal and never hangs.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdngx.nginx.control import NginxControl, NginxNotRunning, find_nginx
from tests.security.conftest import cli, write
from tests.support import stop_process_group, wait_for


@pytest.fixture
def decoy() -> Iterator[subprocess.Popen[bytes]]:
    """An unrelated process (SIGHUP would kill it)."""
    proc = subprocess.Popen(["sleep", "120"], start_new_session=True)
    yield proc
    stop_process_group(proc, grace=2)


def _stale(path: Path, pid: int | str, age: float = 300.0) -> Path:
    """A pid file written `age` seconds ago (before the process now holding that pid started)."""
    write(path, f"{pid}\n")
    t = time.time() - age
    os.utime(path, (t, t))
    return path


@pytest.mark.nginx
def test_a_stale_pid_file_naming_a_reused_pid_is_not_signalled(tmp_path: Path,
                                                               decoy: subprocess.Popen[bytes]) -> None:
    """Standalone config under a prefix; its logs/nginx.pid names the decoy; nginx is not running."""
    prefix = tmp_path / "nginx"
    inv = write(tmp_path / "fdngx.json", json.dumps(
        {"version": 1, "instances": [{"name": "dp0", "host": "127.0.0.1", "port": 8001}]}))
    out = prefix / "nginx.conf"
    _stale(prefix / "logs" / "nginx.pid", decoy.pid)
    proc = cli("render", "-i", str(inv), "--mode", "standalone", "--listen", "127.0.0.1:18998",
               "--out", str(out), "--reload", timeout=60)
    time.sleep(0.3)
    assert decoy.poll() is None, "fdngx signalled an unrelated process named by a stale pid file"
    assert proc.returncode == 0 and "not running" in proc.stderr, proc.stderr
    assert out.exists()


def test_a_process_with_nginx_title_started_after_the_pid_file_is_not_signalled(
        tmp_path: Path, nginx_titled_decoy: subprocess.Popen[bytes]) -> None:
    pid_file = _stale(tmp_path / "nginx.pid", nginx_titled_decoy.pid)
    control = NginxControl(find_nginx(), pid_file=pid_file, timeout=2)
    assert control.master_pid() is None
    with pytest.raises(NginxNotRunning):
        control.reload(None)
    time.sleep(0.3)
    assert nginx_titled_decoy.poll() is None


def test_a_process_without_nginx_title_is_not_signalled_even_if_older_than_the_pid_file(
        tmp_path: Path, decoy: subprocess.Popen[bytes]) -> None:
    time.sleep(1.1)
    pid_file = _stale(tmp_path / "nginx.pid", decoy.pid, age=0)  # written after the decoy started
    control = NginxControl(find_nginx(), pid_file=pid_file, timeout=2)
    assert control.master_pid() is None
    with pytest.raises(NginxNotRunning):
        control.reload(None)
    time.sleep(0.3)
    assert decoy.poll() is None


@pytest.mark.parametrize("content", ["0", "-1", "1", "", "abc", "99999999999999999999", "\xff\xfe", "12 34"])
def test_a_pid_file_naming_nobody_sensible_gives_no_master(tmp_path: Path, content: str) -> None:
    pid_file = tmp_path / "nginx.pid"
    pid_file.write_bytes(content.encode("latin-1"))
    assert NginxControl(find_nginx(), pid_file=pid_file).master_pid() is None


def test_a_pid_file_that_is_a_fifo_does_not_hang(tmp_path: Path) -> None:
    fifo = tmp_path / "nginx.pid"
    os.mkfifo(fifo)
    t0 = time.monotonic()
    assert NginxControl(find_nginx(), pid_file=fifo).master_pid() is None
    assert time.monotonic() - t0 < 2


@pytest.mark.nginx
def test_the_real_master_is_still_recognised(tmp_path: Path) -> None:
    """The identity check must not refuse nginx itself (or the tests above prove nothing)."""
    from tests.support import Nginx

    prefix = tmp_path / "nginx"
    write(prefix / "nginx.conf", f"pid {prefix}/logs/nginx.pid;\nerror_log logs/error.log;\nevents {{}}\n"
          "http { server { listen 127.0.0.1:18997; return 200; } }\n")
    with Nginx(prefix).start() as nginx:
        control = NginxControl(nginx.binary, prefix / "nginx.conf", prefix, "logs/error.log", timeout=10)
        assert nginx.proc is not None
        assert wait_for(lambda: control.master_pid() == nginx.proc.pid, 10, what="the master recognised")
        before = nginx.worker_pids()
        control.reload(None)
        assert wait_for(lambda: nginx.worker_pids() - before, 10, what="new workers after the reload")
