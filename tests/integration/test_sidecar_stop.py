"""`fdngx sidecar` and the locks it shares with other runs, through the real CLI: a SIGTERM while a cycle waits
for another run's apply lock, and `--once` runs (cron) that overlap.

The test process holds the apply lock itself (`.NAME.fdngx-lock`, an flock, as another fdngx run would), so
every wait is one the test controls; nothing sleeps.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.test_sidecar import loop_of
from tests.support import free_ports, stop_process_group, wait_for, write_inventory

pytestmark = pytest.mark.nginx


@contextlib.contextmanager
def holding(lock: Path) -> Iterator[None]:
    """The apply lock of a config, held by this process (as a long apply of another fdngx run would)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def test_sigterm_ends_a_cycle_waiting_for_the_apply_lock(tmp_path: Path) -> None:
    """The wait is up to 120 s, systemd's stop timeout 60 s: the sidecar used to be SIGKILLed mid-wait. Now the
    stop ends the wait: that apply is not made (nothing written) and the sidecar exits 0 at once."""
    with loop_of(tmp_path, n=2, listed=1, interval=0.5) as lp:
        assert lp.sidecar is not None
        before = lp.conf.read_text()
        with holding(lp.conf.with_name(f".{lp.conf.name}.fdngx-lock")):
            lp.write_inventory(2)  # the next cycle must apply, and waits for the lock
            wait_for(lambda: "waiting for the lock" in lp.log.read_text(), 15, what=f"the lock wait ({lp.tail()})")
            t0 = time.monotonic()
            lp.sidecar.send_signal(signal.SIGTERM)
            try:
                code = lp.sidecar.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pytest.fail(f"still running 5 s after SIGTERM, waiting for the lock: {lp.tail()}")
            took = time.monotonic() - t0
        assert code == 0 and took < 3, (code, took, lp.tail())
        text = lp.log.read_text()
        said = [ln for ln in text.splitlines() if "stopping: the apply waited for the lock and was not made" in ln]
        assert said and all(" INFO " in ln and "apply failed" not in ln for ln in said), text  # asked for: no error
        kept = [ln for ln in text.splitlines() if "NOT APPLIED" in ln]  # the new replica, kept from nginx by the stop
        assert kept and all(" INFO " in ln for ln in kept), text
        assert lp.conf.read_text() == before, "nothing written"


def test_overlapping_once_runs_take_turns_with_the_state(tmp_path: Path) -> None:
    """Two `sidecar --once` runs (cron) on one config at once: each used to load the state before any lock and
    save over the other's, losing its reloads (the budget) and health counts. Now the second waits for the
    first's state under the store's lock, as `render --scrape` does: both reloads are kept, and the second
    decides from what the first applied and saw (dp0's weight and failing scrape are not news)."""
    *apis, port = free_ports(3)
    conf = tmp_path / "nginx" / "nginx.conf"
    conf.parent.mkdir()

    def replica(i: int) -> dict[str, object]:  # nothing listens: refused, kept within --refused-grace
        return {"name": f"dp{i}", "host": "127.0.0.1", "port": apis[i], "metrics_port": apis[i], "engine": "sim"}

    runs: list[tuple[subprocess.Popen[bytes], Path]] = []

    def once(inventory: Path) -> tuple[subprocess.Popen[bytes], Path]:
        err = tmp_path / f"{inventory.stem}.err"
        with err.open("wb") as fh:
            proc = subprocess.Popen([sys.executable, "-m", "fdngx", "sidecar", "-i", str(inventory), "--mode",
                                     "standalone", "--listen", f"127.0.0.1:{port}", "--out", str(conf), "--once"],
                                    stdout=subprocess.DEVNULL, stderr=fh, start_new_session=True)
        runs.append((proc, err))
        wait_for(lambda: "waiting for the lock" in err.read_text(), 20, what=f"{inventory.stem} waiting for a lock")
        return proc, err

    first = write_inventory(tmp_path / "first.json", [replica(0)])
    second = write_inventory(tmp_path / "second.json", [replica(0), replica(1)])
    try:
        with holding(conf.with_name(f".{conf.name}.fdngx-lock")):
            once(first)
            once(second)
        for proc, err in runs:
            assert proc.wait(timeout=60) == 0, err.read_text()
    finally:
        for proc, _ in runs:
            stop_process_group(proc)
    state = json.loads(conf.with_name(f".{conf.name}.fdngx-state.json").read_text())
    assert len(state["reloads"]) == 2 and set(state["instances"]) == {"dp0", "dp1"}, state
    said = runs[1][1].read_text()
    assert " dp1: " in said and " dp0: " not in said, said  # dp0's weight and failing scrape are known


def test_a_second_sidecar_on_one_config_is_an_error_not_a_usage_error(tmp_path: Path) -> None:
    """Exit 1 (the machine's state: another sidecar runs), not 2 (a bad command line), and no "for more than
    0s" (this start does not wait)."""
    ports = free_ports(2)
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": p, "engine": "fastdeploy"} for i, p in enumerate(ports)])
    out = tmp_path / "upstream.conf"
    with holding(tmp_path / ".upstream.conf.fdngx-sidecar.lock"):  # as the first sidecar holds it
        proc = subprocess.run([sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--out", str(out),
                               "--no-reload", "--metrics-listen", "off"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "another fdngx sidecar manages this config" in proc.stderr and "more than 0s" not in proc.stderr
    assert f"held by pid {os.getpid()}" in proc.stderr, proc.stderr
    assert not out.exists()


def test_once_beside_a_running_sidecar_is_refused_at_once_not_after_its_wait(tmp_path: Path) -> None:
    """A long-running sidecar never gives its lock back: a cron `sidecar --once` beside it waited the whole
    120 s and then failed (an ops review), two or three piling up a minute apart. Now it is refused at once,
    saying so; another --once still waits its turn (test above)."""
    ports = free_ports(2)
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": f"dp{i}", "host": "127.0.0.1", "port": p, "engine": "fastdeploy"} for i, p in enumerate(ports)])
    out = tmp_path / "upstream.conf"
    base = [sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--out", str(out), "--no-reload",
            "--metrics-listen", "off"]
    daemon = subprocess.Popen([*base, "--interval", "30"], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                              text=True, start_new_session=True)
    lock = tmp_path / ".upstream.conf.fdngx-sidecar.lock"
    try:
        wait_for(lambda: lock.exists() and lock.read_text().strip() == "sidecar", 30, what="the sidecar's lock")
        started = time.monotonic()
        once = subprocess.run([*base, "--once"], capture_output=True, text=True, timeout=100)
        waited = time.monotonic() - started
        assert once.returncode == 1, once.stderr
        assert "a running fdngx sidecar manages this config" in once.stderr, once.stderr
        assert "waiting for the lock" not in once.stderr, f"it waited {waited:.0f} s: {once.stderr}"
        assert daemon.poll() is None, "the running sidecar goes on"
    finally:
        stop_process_group(daemon)


def test_a_taken_metrics_port_is_exit_1_not_a_usage_error(tmp_path: Path) -> None:
    """A --metrics-listen another process holds (or an address not up yet at boot) is the machine's state: exit 1,
    which the shipped unit restarts (RestartPreventExitStatus=2 would leave the sidecar down for good), one line
    naming the option, the address, the errno's words and where to look; nothing written before it. A value
    that does not parse is still a usage error (2)."""
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": "dp0", "host": "127.0.0.1", "port": free_ports(1)[0], "engine": "fastdeploy"}])
    out = tmp_path / "nginx.conf"
    args = [sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--out", str(out), "--mode", "standalone",
            "--listen", f"127.0.0.1:{free_ports(1)[0]}", "--no-reload", "--metrics-listen"]
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        proc = subprocess.run([*args, f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr == (f"fdngx: error: --metrics-listen 127.0.0.1:{port}: cannot listen: Address already in use; "
                           "another process listens there (ss -ltnp)\n"), proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fdngx.json"], "nothing written before the bind"
    bad = subprocess.run([*args, "127.0.0.1:http"], capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2 and bad.stderr.startswith("fdngx: error: --metrics-listen "), bad.stderr


def catches_sighup(pid: int) -> bool:
    """Whether process `pid` has a handler for SIGHUP now (the kernel's SigCgt mask)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (signal.SIGHUP - 1) & 1)
    return False


def test_a_sighup_while_the_sidecar_starts_is_one_re_read_once_its_loop_runs(tmp_path: Path) -> None:
    """The shipped unit is Type=exec: `systemctl reload` (kill -HUP) may come while the sidecar still sets up.
    Its SIGHUP handler came only with its loop, so such a SIGHUP killed it (exit 129, which systemd counts as
    clean: Restart=on-failure leaves it down). Now SIGHUPs are held from the start and the loop, once it runs,
    reads the inventory again once and says so. The test stops the sidecar (SIGSTOP) as soon as it catches
    SIGHUP, sends one, and lets it go on."""
    inv = write_inventory(tmp_path / "fdngx.json", [
        {"name": "dp0", "host": "127.0.0.1", "port": free_ports(1)[0], "engine": "fastdeploy"}])
    said = tmp_path / "stderr"
    with said.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fdngx", "sidecar", "-i", str(inv), "--out",
                                 str(tmp_path / "upstream.conf"), "--no-reload", "--metrics-listen", "off"],
                                stderr=err, start_new_session=True)
    try:
        wait_for(lambda: proc.poll() is not None or catches_sighup(proc.pid), 30, interval=0.005,
                 what="a SIGHUP handler")
        assert proc.poll() is None, said.read_text()
        os.kill(proc.pid, signal.SIGSTOP)
        started = "sidecar: 1 instance(s)" in said.read_text()
        os.kill(proc.pid, signal.SIGHUP)
        os.kill(proc.pid, signal.SIGCONT)
        assert not started, "SIGHUP was caught only once the loop ran: one during the set-up was fatal"
        wait_for(lambda: proc.poll() is not None or "inventory read again (SIGHUP)" in said.read_text(), 30,
                 what="the re-read")
        assert proc.poll() is None, f"exit {proc.returncode}: {said.read_text()}"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=30) == 0, said.read_text()
    finally:
        stop_process_group(proc)
    text = said.read_text()
    assert text.count("SIGHUP during start-up: the inventory is read again as the loop starts") == 1, text
    assert text.count("inventory read again (SIGHUP)") == 1, text
