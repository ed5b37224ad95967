"""The inventory lock (`.<inventory>.registry.lock`) that `fdngx drain`, the launch supervisor and the registry
take for every read-modify-write of an inventory, across processes and accounts: the real CLI, real holders.

- root drains an inventory whose lock `fdngx launch`'s account made (examples/systemd's DynamicUser; uid
  61234 plays it: files given away with os.chown, its writes run with setuid), and a lock root makes is
  one that account can take too, while a third account's lock is still refused;
- two drains of the replicas of two -i files at the same moment cannot drain every replica;
- a drain through a symlinked -i waits for the lock a writer using the real path holds.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from fdngx import inventory as inv_mod
from tests.support import wait_for, write_inventory

ACCOUNT = 61234  # a DynamicUser-range uid
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None,
                                reason="giving files to another account needs root (and util-linux's setpriv)")

# The supervisor's locked rewrite of the inventory (books._write_inventory: load, change, save under the lock).
SUPERVISOR_WRITE = (
    "import sys\nfrom fdngx import inventory as inv\n"
    "with inv.editing(sys.argv[1]) as doc:\n    doc.instances[0].extra['pid'] = int(sys.argv[2])\nprint('written')"
)


def replicas(*names: str) -> list[dict[str, object]]:
    return [{"name": n, "host": "127.0.0.1", "port": 18001 + i} for i, n in enumerate(names)]


def as_account(*args: str) -> subprocess.CompletedProcess[str]:
    """SUPERVISOR_WRITE run as ACCOUNT with systemd's UMask=0027 (fdngx imported from the working directory, as
    the CLI's -m does). By util-linux's setpriv: Popen(user=) could not exec this venv's python in a sandbox."""
    return subprocess.run(["setpriv", f"--reuid={ACCOUNT}", f"--regid={ACCOUNT}", "--clear-groups", "--",
                           sys.executable, "-c", SUPERVISOR_WRITE, *args], capture_output=True, text=True,
                          timeout=60, umask=0o027, cwd=os.getcwd())


def drain(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "fdngx", "drain", *args], capture_output=True, text=True, timeout=90)


class Running:
    """A `fdngx drain` started in the background; its stderr lines are collected as they come."""

    def __init__(self, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "fdngx", "drain", *args], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def waiting(self) -> bool:
        return any("waiting for the lock" in line for line in self.lines)

    def waiting_or_done(self) -> bool:
        return self.waiting() or self.proc.poll() is not None

    def finish(self) -> int:
        try:
            return self.proc.wait(timeout=60)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@contextlib.contextmanager
def holding(lock: Path) -> Iterator[None]:
    """This process holds an flock on `lock` (as a registry heartbeat or a supervisor rewrite does, briefly)."""
    fd = os.open(lock, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


@pytest.fixture
def account_dir() -> Iterator[Path]:
    """A directory of ACCOUNT's that it can reach (pytest's tmp_path sits under a root-only 0700 one)."""
    d = Path(tempfile.mkdtemp(prefix="fdngx-lock-", dir="/tmp"))
    try:
        os.chown(d, ACCOUNT, ACCOUNT)
        os.chmod(d, 0o755)
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def owner_and_mode(path: Path) -> tuple[int, int, int]:
    st = path.stat(follow_symlinks=False)
    return st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)


@needs_root
def test_root_drains_where_the_launch_account_made_the_lock_and_a_lock_root_makes_serves_both(
        account_dir: Path) -> None:
    path = write_inventory(account_dir / "fdngx.json", replicas("dp0", "dp1"))
    os.chown(path, ACCOUNT, ACCOUNT)
    os.chmod(path, 0o640)
    lock = inv_mod.lock_path(path)
    # the supervisor's first write makes the lock, as its own account
    first = as_account(str(path), "41")
    assert first.returncode == 0 and "written" in first.stdout, first.stderr
    assert owner_and_mode(lock) == (ACCOUNT, ACCOUNT, 0o600)
    # the sysadmin drains as root (orig: "the lock file is not a regular file owned by this user")
    done = drain("dp0", "-i", str(path))
    assert done.returncode == 0, done.stderr
    assert inv_mod.load(path).by_name()["dp0"].drain is True
    assert owner_and_mode(path) == (ACCOUNT, ACCOUNT, 0o640)  # root's rewrite keeps the file the account's
    # a lock root makes (the old one removed, as the old message told) is the account's: the supervisor takes
    # it (orig: root's 0600 lock, which the supervisor could not open, so it wrote without it)
    lock.unlink()
    assert drain("dp0", "--undo", "-i", str(path)).returncode == 0
    assert owner_and_mode(lock) == (ACCOUNT, ACCOUNT, 0o600)
    again = as_account(str(path), "42")
    assert again.returncode == 0 and "written" in again.stdout, again.stderr
    assert inv_mod.load(path).by_name()["dp0"].extra["pid"] == 42
    # a third account's lock is still refused, and nothing is written
    os.chown(lock, ACCOUNT + 1, ACCOUNT + 1)
    before = path.read_bytes()
    refused = drain("dp1", "-i", str(path))
    assert refused.returncode == 1
    assert f"{lock}: the lock file is not a regular file owned by this user (or uid {ACCOUNT}); remove it" \
        in refused.stderr, refused.stderr
    assert path.read_bytes() == before


def test_two_drains_on_two_files_at_once_leave_a_replica_in_rotation(tmp_path: Path) -> None:
    a = write_inventory(tmp_path / "a.json", replicas("a0"))
    b = write_inventory(tmp_path / "b.json", [{"name": "b0", "host": "127.0.0.1", "port": 18002}])
    with holding(inv_mod.lock_path(a)):  # a writer of a.json holds its lock a moment
        first = Running("a0", "-i", str(a), "-i", str(b))
        wait_for(first.waiting, 30, what="the first drain waiting for a.json's lock")  # orig: b.json read already
        second = Running("b0", "-i", str(a), "-i", str(b))
        wait_for(second.waiting_or_done, 30, what="the second drain waiting or done")  # orig: drained b0, done
    codes = sorted([first.finish(), second.finish()])
    drained = [inv_mod.load(p).instances[0].drain for p in (a, b)]
    assert drained.count(True) == 1, (drained, first.lines, second.lines)
    assert codes == [0, 1]
    assert any("is the last instance in rotation" in line for line in [*first.lines, *second.lines])


def test_a_drain_through_a_symlinked_inventory_waits_for_the_lock_of_the_real_file(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "etc").mkdir()
    real = write_inventory(tmp_path / "real" / "fdngx.json", replicas("dp0", "dp1"))
    link = tmp_path / "etc" / "fdngx.json"
    link.symlink_to("../real/fdngx.json")
    real_lock = real.parent / ".fdngx.json.registry.lock"
    with holding(real_lock):  # the supervisor or the registry, which use the real path, rewriting it
        run = Running("dp0", "-i", str(link))
        wait_for(run.waiting_or_done, 30, what="the drain waiting or done")
        assert run.proc.poll() is None, f"drained while the real file's lock was held: {run.lines}"
        assert any(f"{real_lock}: waiting for the lock" in line for line in run.lines), run.lines
        assert inv_mod.load(real).by_name()["dp0"].drain is False
    assert run.finish() == 0, run.lines
    assert inv_mod.load(real).by_name()["dp0"].drain is True and link.is_symlink()
    assert not (link.parent / ".fdngx.json.registry.lock").exists()
