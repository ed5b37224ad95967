"""The launch lock: one launch per inventory, from its preflight to its supervisor's last breath.

Checking the pidfile and the ports holds nothing: two launches started together both pass, and the second
overwrites the first's pidfile. `fdngx launch` takes an exclusive flock on `.<inventory>.launch.lock`
(beside the inventory, next to its `.registry.lock`) before anything else, without waiting; the supervisor
holds it until it exits (a detached one inherits the very descriptor). The kernel drops it with the last
holder, so a crashed supervisor never wedges the next launch. Engines never inherit it (close-on-exec).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import stat
from pathlib import Path

from fdngx.errors import LaunchError
from fdngx.launch.pidfile import live_supervisor
from fdngx.launch.probe import fd_links
from fdngx.system import procs
from fdngx.system.files import real_target


def lock_path(inventory: str | Path) -> Path:
    """Beside the file the inventory's writes land in (a symlink's target): two names of one inventory share
    one lock, as they share its inventory lock (fdngx.inventory.lock_path) and pidfile (plan.pidfile_for)."""
    p = real_target(Path(inventory))
    return p.with_name(f".{p.name}.launch.lock")


class LaunchLock:
    """An exclusive flock held through an open descriptor (`fd`); close() lets it go."""

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path

    @classmethod
    def take(cls, inventory: str | Path, pidfile: str | Path) -> LaunchLock:
        """Take the lock now or raise a LaunchError naming who holds it."""
        path = lock_path(inventory)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, 0o600)
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # O_NOFOLLOW: never through a link somebody planted
                raise LaunchError(f"{path}: the launch lock is a symbolic link; remove it") from None
            if not os.path.lexists(path):  # none there: nothing to remove, its directory refuses a new file
                raise LaunchError(f"{path}: cannot create the launch lock ({exc.strerror}); nothing was "
                                  "started") from None
            raise LaunchError(f"{path}: cannot open the launch lock ({exc.strerror}); remove it if it is not "
                              "a file of yours") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise LaunchError(f"{path}: the launch lock is not a regular file; remove it")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise LaunchError(f"{path}: cannot lock ({exc.strerror})") from None
                raise _busy(path, inventory, pidfile) from None
        except BaseException:
            os.close(fd)
            raise
        return cls(fd, path)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _holder(path: Path) -> str:
    """", held by pid N (command)": a process that has the lock file open (the kernel's lock table names the
    process that took the lock, which for a detached launch has exited); "" when none is visible."""
    me = os.getpid()
    for pid in sorted(int(d) for d in os.listdir("/proc") if d.isdigit()):
        if pid != me and str(path) in fd_links(pid):
            return f", held by pid {pid} ({procs.cmdline(pid)[:80]})"
    return ""


def _busy(path: Path, inventory: str | Path, pidfile: str | Path) -> LaunchError:
    inv = Path(inventory).absolute()
    running = None
    with contextlib.suppress(LaunchError):  # an unreadable pidfile: the lock still says enough
        running = live_supervisor(pidfile)
    if running is not None:
        return LaunchError(f"{pidfile}: replicas launched with this inventory are still supervised by pid "
                           f"{running.supervisor.pid}; run 'fdngx stop --inventory {inv}' first")
    return LaunchError(f"{path}: another fdngx launch with this inventory holds the launch lock{_holder(path)}; "
                       f"wait for it, or run 'fdngx stop --inventory {inv}'")
