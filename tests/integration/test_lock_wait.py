"""A run that waits for another's lock (day two: a cron `render --reload` while the sidecar applies) says so
after a second, naming the holder from the kernel's lock table, instead of hanging silently for up to two
minutes; it says when it got the lock, and a give-up names the holder too. The holder is a real process."""

from __future__ import annotations

import logging
import queue
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdngx.errors import ApplyError
from fdngx.system.files import file_lock, lock_waits_said_at
from tests.support import REPO, fdngx, wait_for

# Several lines: a command line with newlines must still make a one-line message.
HOLD = "import fcntl, os, sys, time\nfd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o600)\n" \
       "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)"


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[Path, subprocess.Popen[str]]]:
    """A process of ours holding an flock on the config's lock file until the test ends it (by PID)."""
    lock = tmp_path / ".fdngx.conf.fdngx-lock"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "held"
        yield lock, proc
    finally:
        proc.kill()
        proc.wait(timeout=10)


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    got: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            got.put(line.rstrip("\n"))

    threading.Thread(target=pump, daemon=True).start()
    return got


def wait_line(got: queue.Queue[str], needle: str, timeout: float) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = got.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            break
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} within {timeout} s: {seen}")


def test_render_says_it_waits_for_the_lock_and_who_holds_it(
        tmp_path: Path, holder: tuple[Path, subprocess.Popen[str]]) -> None:
    lock, held = holder
    out = tmp_path / "fdngx.conf"
    proc = subprocess.Popen([sys.executable, "-m", "fdngx", "render", "-i", str(REPO / "examples" / "fdngx.json"),
                             "--out", str(out)], stderr=subprocess.PIPE, text=True)
    try:
        got = lines_of(proc)
        waiting = wait_line(got, "waiting for the lock", 30)
        assert f"{lock}: waiting for the lock, held by pid {held.pid} (" in waiting, waiting
        assert "-c import fcntl, os, sys, time?fd = os.open(" in waiting  # its command line, on one line
        assert not out.exists()
        held.kill()  # the other run ends: this one goes on
        assert "got the lock after" in wait_line(got, "got the lock", 30)
        assert proc.wait(timeout=60) == 0
        assert out.exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_giving_up_on_the_lock_names_the_holder(holder: tuple[Path, subprocess.Popen[str]]) -> None:
    lock, held = holder
    with pytest.raises(ApplyError) as caught, file_lock(lock, timeout=0.5):
        pass
    message = str(caught.value)
    assert message.startswith(f"{lock}: another fdngx run holds the lock for more than 0.5s, held by pid {held.pid} (")
    assert message.endswith("; giving up") and "\n" not in message


def test_a_quiet_render_that_only_waited_for_the_lock_says_nothing(
        tmp_path: Path, holder: tuple[Path, subprocess.Popen[str]]) -> None:
    """--quiet is a crontab's "mail only on a change or a failure": a run that waited for an overlapping run's
    lock and then found its file current says nothing; the wait is said at DEBUG (seen with -v) instead."""
    _lock, held = holder
    inventory, out, said = str(REPO / "examples" / "fdngx.json"), tmp_path / "fdngx.conf", tmp_path / "stderr"
    out.write_text(fdngx("render", "-i", inventory, "--out", "-", check=True).stdout)  # current: nothing to do
    with said.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "fdngx", "-v", "render", "-i", inventory, "--out", str(out),
                                 "--quiet"], stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        wait_for(lambda: "waiting for the lock" in said.read_text(), 30, what="the wait, said")
        held.kill()  # the other run ends: this one goes on
        stdout, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
    lines = said.read_text().splitlines()
    assert proc.returncode == 0 and stdout == "", (proc.returncode, stdout, lines)
    assert [ln for ln in lines if " fdngx DEBUG " not in ln] == [], "only DEBUG lines (-v): nothing for cron"
    assert any("got the lock after" in ln for ln in lines), lines


def test_a_quiet_wait_that_gives_up_is_still_an_error(holder: tuple[Path, subprocess.Popen[str]],
                                                      caplog: pytest.LogCaptureFixture) -> None:
    """Under lock_waits_said_at(DEBUG) (render --quiet) the wait is said at DEBUG, and giving up still raises."""
    lock, _held = holder
    caplog.set_level(logging.DEBUG, logger="fdngx.files")
    with lock_waits_said_at(logging.DEBUG), pytest.raises(ApplyError, match="giving up"), file_lock(lock, timeout=0.5):
        pass
    waits = [r for r in caplog.records if "waiting for the lock" in r.getMessage()]
    assert [r.levelno for r in waits] == [logging.DEBUG], caplog.text
